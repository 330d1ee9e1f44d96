"""What the exllamav2 serving path costs per token, measured without a GPU.

The generator is the scripted stand-in (tests/support/exllamav2_standin): exllamav2's own job and page
bookkeeping per token, no forward pass. So the figures are the overhead the worker adds around a real
GPU step, which for an 8B model takes 10-30 ms a token:

- baseline: the stand-in generator driven in a plain loop (enqueue, iterate until EOS);
- backend: the same through ExLlamaV2Backend.stream (the generator thread, hand-off to the event loop);
- HTTP: the same through the worker app and its SSE stream (what a client sees).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.bench.common import header, median, row, time_stream

TOKENS = 400
ROUNDS = 5


def _standin():
    from tests.support import exllamav2_standin

    return exllamav2_standin


def baseline(api, model_dir: Path, reply: list[int]) -> float:
    from rbee_fleet.worker.backends.base import WorkerSpec
    from rbee_fleet.worker.backends.exllamav2_load import load_model

    m = load_model(WorkerSpec("b", str(model_dir), "exllamav2", "cuda:0", ctx_size=1024, options={"warmup": False}), api)
    import torch

    ids = torch.tensor([reply[:4]], dtype=torch.long)
    start = time.perf_counter()
    job = api.Job(input_ids=ids, max_new_tokens=TOKENS, identifier=1)
    m.generator.enqueue(job)
    produced = 0
    while m.generator.num_remaining_jobs():
        for r in m.generator.iterate():
            if r.get("stage") == "streaming" and "token_ids" in r:
                produced += int(r["token_ids"].shape[-1])
    return produced / (time.perf_counter() - start)


async def through_backend(api, model_dir: Path) -> float:
    from rbee_fleet.worker.backends.base import SamplingParams, WorkerSpec
    from rbee_fleet.worker.backends.exllamav2 import ExLlamaV2Backend
    from rbee_fleet.worker.backends.exllamav2_load import load_model

    spec = WorkerSpec("b", str(model_dir), "exllamav2", "cuda:0", ctx_size=1024, options={"warmup": False})
    backend = ExLlamaV2Backend(spec, load_model(spec, api))
    try:
        start = time.perf_counter()
        produced = 0
        async for item in backend.stream([0, 2, 3], SamplingParams(max_tokens=TOKENS)):
            produced += getattr(item, "tokens", 0) if not hasattr(item, "reason") else 0
        return produced / (time.perf_counter() - start)
    finally:
        backend.close()


async def through_http(model_dir: Path, concurrent: int) -> tuple[float, float]:
    """(median first-token ms, aggregate tokens/s) for ``concurrent`` streams through the worker app."""
    from rbee_fleet.worker import app as worker_app
    from rbee_fleet.worker.backends.base import WorkerSpec
    from rbee_fleet.worker.openai_api import RUNTIME
    from rbee_fleet.worker.runtime import WorkerSettings
    from tests.support.procs import free_port

    port = free_port()
    spec = WorkerSpec("tiny", str(model_dir), "exllamav2", "cuda:0", ctx_size=1024, max_queue=16,
                      options={"warmup": False, "max_batch_size": 4})
    app = worker_app.create_app(WorkerSettings(spec=spec, worker_id="bench", hive_id="bench", host="127.0.0.1",
                                               port=port, advertise_url=f"http://127.0.0.1:{port}"))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        while app[RUNTIME].state.value == "loading":
            await asyncio.sleep(0.05)
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": TOKENS}
        async with aiohttp.ClientSession() as session:
            start = time.perf_counter()
            timings = await asyncio.gather(*(time_stream(session, f"http://127.0.0.1:{port}/v1/completions", body)
                                             for _ in range(concurrent)))
            took = time.perf_counter() - start
        return median([t.ttft_s * 1000 for t in timings]), sum(t.chunks for t in timings) / took
    finally:
        await runner.cleanup()


def main() -> None:
    standin = _standin()
    from rbee_fleet.worker.backends import exllamav2_load

    header("exllamav2 serving path (scripted stand-in generator, no GPU): overhead per token")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = standin.make_tiny_model(Path(tmp) / "tiny")
        tok = standin.REAL_API.Tokenizer(standin.REAL_API.Config(str(model_dir)))
        reply = standin.reply_of(tok, " bees")
        api, _ = standin.standin_api(lambda prompt: reply, eos_id=None)
        exllamav2_load.load_api = lambda: api  # the worker app below loads through it
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
        base = median([baseline(api, model_dir, reply) for _ in range(ROUNDS)])
        via_backend = median([asyncio.run(through_backend(api, model_dir)) for _ in range(ROUNDS)])
        results = [asyncio.run(through_http(model_dir, 1)) for _ in range(ROUNDS)]
        ttft, via_http = median([r[0] for r in results]), median([r[1] for r in results])
        ttft4, via_http4 = asyncio.run(through_http(model_dir, 4))
    row("baseline: generator loop", f"{base:8.0f} tok/s  ({1e6 / base:6.0f} us/token)")
    row("backend.stream (generator thread + event loop)", f"{via_backend:8.0f} tok/s  ({1e6 / via_backend:6.0f} us/token)"
        f"  ratio {via_backend / base:.2f}")
    row("worker HTTP SSE, 1 stream", f"{via_http:8.0f} tok/s  ({1e6 / via_http:6.0f} us/token)  ratio {via_http / base:.2f}"
        f"  first token {ttft:.1f} ms")
    row("worker HTTP SSE, 4 streams batched", f"{via_http4:8.0f} tok/s aggregate  first token {ttft4:.1f} ms")
    added = 1e6 / via_http - 1e6 / base
    row("added per token vs a 20 ms GPU step", f"{added:6.0f} us = {100 * added / 20000:.2f} %")


if __name__ == "__main__":
    main()
