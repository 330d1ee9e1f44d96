"""Worker vs plain llama-cpp-python: decode tokens/s and time to first token, same model, prompt, settings.

Targets (issue 2): at least 0.95 of plain llama-cpp-python's decode tokens/s, and under 5 ms added to the
time to first token. The two run one after the other, never at once, alternating rounds.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.bench.common import StreamTiming, header, median, row, time_stream
from tests.support import procs

PROMPT = [{"role": "user", "content": "Write a long story about a bee who learns to fly."}]
MAX_TOKENS = 128
ROUNDS = 8
# One core is left to the HTTP side (the worker's event loop and the benchmark's client); plain
# llama-cpp-python gets the same thread count, so the comparison is like for like.
THREADS = max(1, min(4, (os.cpu_count() or 2) - 1))
CTX = 2048


def plain_llama_cpp(llm) -> StreamTiming:
    start = time.perf_counter()
    first = None
    chunks = 0
    for chunk in llm.create_chat_completion(messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, stream=True):
        delta = chunk["choices"][0]["delta"]
        if delta.get("content"):
            chunks += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return StreamTiming((first or end) - start, end - start, chunks)


async def run() -> dict[str, float]:
    from llama_cpp import Llama

    model = procs.model_path()
    tmp = Path(tempfile.mkdtemp(prefix="rbee-bench-"))
    worker = procs.start_worker(tmp, threads=THREADS, ctx_size=CTX)
    llm = Llama(model, n_ctx=CTX, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    plain: list[StreamTiming] = []
    ours: list[StreamTiming] = []
    body = {"model": "smollm2", "messages": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    try:
        async with aiohttp.ClientSession() as session:
            await time_stream(session, f"{worker.url}/v1/chat/completions", body)  # warm-up
            plain_llama_cpp(llm)
            for _ in range(ROUNDS):
                plain.append(plain_llama_cpp(llm))
                ours.append(await time_stream(session, f"{worker.url}/v1/chat/completions", body))
    finally:
        llm.close()
        worker.stop()
    result = {
        "plain_tps": median([t.decode_tps for t in plain]),
        "worker_tps": median([t.decode_tps for t in ours]),
        "plain_ttft_ms": median([t.ttft_s for t in plain]) * 1000,
        "worker_ttft_ms": median([t.ttft_s for t in ours]) * 1000,
        "tokens": median([t.chunks for t in ours]),
    }
    header(f"worker vs plain llama-cpp-python (SmolLM2-135M Q4_1, {THREADS} threads, {MAX_TOKENS} tokens, "
           f"greedy, median of {ROUNDS})")
    row("plain llama-cpp-python decode", f"{result['plain_tps']:.1f} tok/s")
    row("llm-worker-rbee decode (over HTTP/SSE)", f"{result['worker_tps']:.1f} tok/s")
    row("ratio (target >= 0.95)", f"{result['worker_tps'] / result['plain_tps']:.3f}")
    row("plain time to first token", f"{result['plain_ttft_ms']:.1f} ms")
    row("worker time to first token", f"{result['worker_ttft_ms']:.1f} ms")
    row("added time to first token (target < 5 ms)", f"{result['worker_ttft_ms'] - result['plain_ttft_ms']:+.1f} ms")
    return result


def main() -> None:
    asyncio.run(run())


if __name__ == "__main__":
    main()
