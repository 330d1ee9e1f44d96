"""The fleet against what a user would run instead: llama.cpp's own ``llama-server``, started by hand.

Both sides use the same llama-server binary and each side's default settings: the fleet is the default
inventory's worker (``ctx_size`` 2048, default slots and threads) behind the queen; the baseline is
``llama-server -m MODEL`` with no other flag (its own defaults: 4 slots sharing the model's 8192-token
context, its own thread count), which for SmolLM2 is the same engine configuration, so any gap is the
fleet's cost. Requests are identical greedy chat completions through the official client's wire format.

Targets (issue 9): one stream's decode tok/s >= 0.95x; tokens/s summed at 1, 4 and 8 concurrent streams
>= 0.95x; added median time to first token <= 5 ms. The sides take turns (never at once): see ``measure``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.bench.common import StreamTiming, default_inventory, header, median, row, time_stream
from tests.support import procs

PROMPT = [{"role": "user", "content": "Write a long story about a bee who learns to fly."}]
MAX_TOKENS = 128
ROUNDS = int(os.environ.get("RBEE_BENCH_ROUNDS_ENGINE", "6"))
CONCURRENCY = (1, 4, 8)


def start_llama_server(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    """llama-server as a user starts it: the model and an address, nothing else."""
    from rbee_fleet.common.llama_engine import find_binary

    binary = find_binary()
    log = open(tmp / "llama-server.log", "wb")  # noqa: SIM115 - closed with the process
    env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}
    return subprocess.Popen([str(binary), "-m", procs.model_path(), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


async def concurrent(session: aiohttp.ClientSession, url: str, body: dict, n: int) -> tuple[float, list[StreamTiming]]:
    """Tokens per second summed over ``n`` streams started at once, and each stream's timing."""
    start = time.perf_counter()
    timings = await asyncio.gather(*(time_stream(session, url, body) for _ in range(n)))
    elapsed = time.perf_counter() - start
    return sum(t.chunks for t in timings) / elapsed, list(timings)


async def measure(urls: dict[str, str]) -> dict[str, dict[str, float]]:
    """Each side's figures, the sides taking turns: single streams request by request, concurrent streams
    round by round, so that the machine's drift (large on a small VM) falls on both alike."""
    body = {"model": "smollm2", "messages": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    out: dict[str, dict[str, float]] = {side: {} for side in urls}
    # A new connection per request on both sides: llama-server closes idle keep-alive connections, and a
    # reused one it had closed fails the request (the official client retries; this bench does not).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for url in urls.values():
            await time_stream(session, url, body)  # warm-up
        singles: dict[str, list[StreamTiming]] = {side: [] for side in urls}
        for _ in range(ROUNDS):
            for side, url in urls.items():
                singles[side].append(await time_stream(session, url, body))
        for side, timings in singles.items():
            out[side]["decode_tps"] = median([t.decode_tps for t in timings])
            out[side]["ttft_ms"] = median([t.ttft_s for t in timings]) * 1000
        for n in CONCURRENCY:
            rates: dict[str, list[float]] = {side: [] for side in urls}
            firsts: dict[str, list[float]] = {side: [] for side in urls}
            for _ in range(max(2, ROUNDS // 2)):
                for side, url in urls.items():
                    rate, timings = await concurrent(session, url, body, n)
                    rates[side].append(rate)
                    firsts[side] += [t.ttft_s for t in timings]
            for side in urls:
                out[side][f"sum_tps_{n}"] = median(rates[side])
                out[side][f"ttft_ms_{n}"] = median(firsts[side]) * 1000
    return out


async def run() -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="rbee-bench-"))
    port = procs.free_port()
    inv = default_inventory(tmp / "inv.toml", port=port, worker_port_base=procs.free_port_range(5),
                            workers=[{"model": "smollm2"}])
    baseline_port = procs.free_port()
    server = start_llama_server(tmp, baseline_port)
    queen = None
    try:
        procs.wait_until(lambda: _healthy(f"http://127.0.0.1:{baseline_port}"), 60, what="llama-server by hand")
        queen = procs.start_queen(tmp, inv, tmp / "home", port)
        worker = procs.wait_workers_ready(queen, 1)[0]["heartbeat"]
        both = await measure({"hand": f"http://127.0.0.1:{baseline_port}/v1/chat/completions",
                              "fleet": f"{queen.url}/v1/chat/completions"})
        hand, fleet = both["hand"], both["fleet"]
    finally:
        if queen is not None:
            queen.stop()
        server.terminate()
        server.wait(20)
    header(f"the fleet vs llama-server by hand (SmolLM2-135M Q4_1, defaults on both sides: "
           f"{worker['slots_total']} slots; {MAX_TOKENS} tokens, greedy; medians)")
    row("one stream decode: llama-server by hand", f"{hand['decode_tps']:.1f} tok/s")
    row("one stream decode: through the queen", f"{fleet['decode_tps']:.1f} tok/s")
    row("ratio (target >= 0.95)", f"{fleet['decode_tps'] / hand['decode_tps']:.3f}")
    for n in CONCURRENCY:
        row(f"{n} concurrent streams, tok/s summed: by hand / queen",
            f"{hand[f'sum_tps_{n}']:.1f} / {fleet[f'sum_tps_{n}']:.1f}: "
            f"ratio {fleet[f'sum_tps_{n}'] / hand[f'sum_tps_{n}']:.3f} (target >= 0.95)")
        row(f"{n} concurrent streams, median first token: by hand / queen",
            f"{hand[f'ttft_ms_{n}']:.0f} / {fleet[f'ttft_ms_{n}']:.0f} ms")
    row("time to first token, one stream: by hand / queen", f"{hand['ttft_ms']:.1f} / {fleet['ttft_ms']:.1f} ms")
    row("added time to first token (target <= 5 ms)", f"{fleet['ttft_ms'] - hand['ttft_ms']:+.1f} ms")
    return {"hand": hand, "fleet": fleet}  # type: ignore[dict-item]


def _healthy(url: str) -> bool:
    try:
        return procs.http_json(f"{url}/health", timeout=2)[0] == 200
    except OSError:
        return False


def main() -> None:
    asyncio.run(run())


if __name__ == "__main__":
    main()
