"""On a machine with an NVIDIA GPU: a real exllamav2 worker placed by the hive, answering through the queen.

Skipped, with the reason, where CUDA is absent. The model is ``$RBEE_GPU_TEST_MODEL`` (a local EXL2
directory or an ``hf:OWNER/REPO@BRANCH`` source), by default a small EXL2 quant from the hub.
Run with ``just test -m gpu -s`` to see the figures printed.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import aiohttp
import openai
import pytest

from rbee_fleet.common.jobs import JobClient
from rbee_fleet.contracts.fleet import ModelDownloadOp, WorkerSpawnOp
from tests.support import procs

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

DEFAULT_MODEL = "hf:turboderp/Llama-3.2-1B-Instruct-exl2@4.0bpw"


def cuda_missing() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"no CUDA device visible to torch {torch.__version__} (built for CUDA {torch.version.cuda})"
    return None


@pytest.fixture(scope="module")
def cuda():
    reason = cuda_missing()
    if reason:
        pytest.skip(f"needs an NVIDIA GPU with CUDA: {reason}")


@pytest.fixture(scope="module")
def gpu_queen(cuda, module_tmp):
    port = procs.free_port()
    inventory = procs.write_inventory(module_tmp / "inventory.toml", port=port,
                                      worker_port_base=procs.free_port_range(8), workers=[])
    proc = procs.start_queen(module_tmp, inventory, module_tmp / "home", port)
    yield proc
    proc.stop()


async def job(queen, op) -> dict:
    async with aiohttp.ClientSession() as session:
        return await JobClient(session, queen.url, headers=procs.admin_headers(queen.extra["home"])).run(op)


@pytest.fixture(scope="module")
def gpu_model(gpu_queen) -> str:
    source = os.environ.get("RBEE_GPU_TEST_MODEL", DEFAULT_MODEL)
    result = asyncio.run(job(gpu_queen, ModelDownloadOp(source=source, name="gpu-test")))
    assert result["model"]["format"] in ("exl2", "safetensors")
    return "gpu-test"


def test_stack_check_passes_here(cuda):
    out = subprocess.run([sys.executable, "-m", "rbee_fleet.hive", "--check"], capture_output=True, text=True, timeout=300)
    print(out.stdout)
    assert out.returncode == 0, out.stdout


async def test_exllamav2_worker_streams_through_the_queen(gpu_queen, gpu_model):
    started = time.monotonic()
    result = await job(gpu_queen, WorkerSpawnOp(model=gpu_model, device="auto", ctx_size=2048))
    worker = result["worker"]
    assert worker["backend"] == "exllamav2" and worker["device"].startswith("cuda:")
    [view] = procs.wait_workers_ready(gpu_queen, 1, timeout=900)
    print(f"\nloaded on {worker['device']} in {time.monotonic() - started:.1f} s")
    hb = view["heartbeat"]
    assert hb["cache_tokens_total"] > 0 and hb["vram_used_mb"] > 0 and hb["slots_total"] >= 1

    client = openai.AsyncOpenAI(base_url=f"{gpu_queen.url}/v1", api_key="unused", max_retries=0)
    t0 = time.monotonic()
    first = None
    parts: list[str] = []
    stream = await client.chat.completions.create(
        model=gpu_model, messages=[{"role": "user", "content": "Name three things bees make."}],
        max_tokens=64, temperature=0, stream=True, stream_options={"include_usage": True})
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.monotonic()
                parts.append(choice.delta.content)
    total = time.monotonic() - t0
    text = "".join(parts)
    assert text.strip() and usage.completion_tokens > 0
    print(f"first token {1000 * (first - t0):.0f} ms, {usage.completion_tokens} tokens in {total:.2f} s "
          f"({usage.completion_tokens / total:.1f} tok/s): {text!r}")

    # Several at once: continuous batching when flash-attn is there, queued otherwise.
    t0 = time.monotonic()
    answers = await asyncio.gather(*(client.completions.create(
        model=gpu_model, prompt=f"Bee fact number {i}:", max_tokens=48, temperature=0.7) for i in range(8)))
    took = time.monotonic() - t0
    tokens = sum(a.usage.completion_tokens for a in answers)
    print(f"8 concurrent requests: {tokens} tokens in {took:.2f} s ({tokens / took:.1f} tok/s aggregate), "
          f"slots {hb['slots_total']}")
    assert all(a.choices[0].text for a in answers)


async def test_cancelled_stream_gives_the_cache_back(gpu_queen, gpu_model):
    [view] = procs.wait_workers_ready(gpu_queen, 1, timeout=900)
    total = view["heartbeat"]["cache_tokens_total"]
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{gpu_queen.url}/v1/completions", json={
            "model": gpu_model, "prompt": "Write a very long story about bees.", "max_tokens": 1500, "stream": True})
        n = 0
        async for _ in resp.content:
            n += 1
            if n > 10:
                break
        resp.close()

    def freed() -> bool:
        _, body, _ = procs.http_json(f"{gpu_queen.url}/v1/workers")
        hb = body["workers"][0]["heartbeat"]
        return hb["cache_tokens_free"] == total and hb["slots_busy"] == 0

    procs.wait_until(freed, 30, what="the cache to be free again")
