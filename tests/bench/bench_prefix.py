"""Prefix-aware routing and on-demand loading, each against its baseline measured in the same run.

Multi-turn chat (issue 10): conversations of several turns that share a long system prompt and grow their
history, a few at a time, over 2 workers: time to first token of turns 2 and later, and tokens/s summed,
with prefix routing against least-busy routing (a queen of each, fresh workers each).
Targets: at least 3x lower median time to first token; tokens/s no worse.

On-demand load: from the first request for a model no worker runs to its first token, against the
worker's own load (start the same worker by hand, wait until it is ready, ask it straight).
Target: under 1 s of overhead.

The issue's figures are 8 conversations of 6 turns with a 1,500-token system prompt, 4 at a time; the
environment variables below scale them (the output says when they differ).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from rbee_fleet.common.jobs import JobClient
from rbee_fleet.contracts.fleet import WorkerStopOp
from tests.bench.common import default_inventory, header, median, row
from tests.support import procs

CONVERSATIONS = int(os.environ.get("RBEE_BENCH_CONVERSATIONS", "8"))
TURNS = int(os.environ.get("RBEE_BENCH_TURNS", "6"))
SYSTEM_TOKENS = int(os.environ.get("RBEE_BENCH_SYSTEM_TOKENS", "1500"))
AT_ONCE = int(os.environ.get("RBEE_BENCH_AT_ONCE", "4"))
ANSWER_TOKENS = int(os.environ.get("RBEE_BENCH_ANSWER_TOKENS", "24"))
LOAD_ROUNDS = int(os.environ.get("RBEE_BENCH_LOAD_ROUNDS", "3"))
ISSUE = (8, 6, 1500, 4)


def system_prompt(tokens: int) -> str:
    """A handbook of about ``tokens`` SmolLM2 tokens (roughly 12 per line below)."""
    lines = [f"Rule {i}: hive {i % 17} is inspected on day {i % 29} and its frames are counted." for i in range(tokens // 17)]
    return "You are the assistant of a bee farm. The farm's handbook follows.\n" + "\n".join(lines)


async def first_token(session: aiohttp.ClientSession, url: str, body: dict,
                      headers: dict | None = None) -> tuple[float, str, int]:
    """(seconds to the first content token, the answer, completion tokens) of a streamed chat request."""
    start = time.perf_counter()
    ttft = None
    text: list[str] = []
    tokens = 0
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with session.post(url, json=payload, headers=headers) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            if not raw.startswith(b"data: {"):
                continue
            data = json.loads(raw[6:])
            for choice in data.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text.append(piece)
            if data.get("usage"):
                tokens = data["usage"].get("completion_tokens", 0)
    return (ttft if ttft is not None else time.perf_counter() - start), "".join(text), tokens


def start_fleet(tmp: Path, *, prefix: bool, workers: list[dict], extra: str = "", models: str = "") -> procs.Proc:
    port = procs.free_port()
    queen_extra = f"prefix_routing = {'true' if prefix else 'false'}\nadmission_timeout_s = 600\n{extra}"
    inv = default_inventory(tmp / "inv.toml", port=port, worker_port_base=procs.free_port_range(10),
                                workers=workers, queen_extra=queen_extra, tail=models)
    inv.write_text(inv.read_text().replace("admission_timeout_s = 5\n", "", 1))  # the test default: too short here
    return procs.start_queen(tmp, inv, tmp / "home", port, timeout=180)


async def chat_run(prefix: bool) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="rbee-bench-prefix-"))
    ctx = SYSTEM_TOKENS + TURNS * (ANSWER_TOKENS + 40) + 256
    slots = max(1, -(-AT_ONCE // 2))
    queen = start_fleet(tmp, prefix=prefix, workers=[
        {"model": "smollm2", "count": 2, "threads": 1, "ctx_size": ctx, "slots": slots}])
    system = system_prompt(SYSTEM_TOKENS)
    ttfts: list[float] = []
    tokens = 0
    prompt_tokens: list[int] = []
    try:
        procs.wait_workers_ready(queen, 2, timeout=300)
        url = f"{queen.url}/v1/chat/completions"
        gate = asyncio.Semaphore(AT_ONCE)

        async def conversation(c: int, session: aiohttp.ClientSession) -> None:
            nonlocal tokens
            async with gate:
                messages = [{"role": "system", "content": system}]
                for turn in range(TURNS):
                    messages.append({"role": "user", "content": f"Conversation {c}, question {turn}: which hive is "
                                                                f"inspected on day {(c * 7 + turn) % 29}?"})
                    body = {"model": "smollm2", "messages": messages, "max_tokens": ANSWER_TOKENS, "temperature": 0}
                    ttft, answer, n = await first_token(session, url, body)
                    tokens += n
                    if turn > 0:
                        ttfts.append(ttft)
                    messages.append({"role": "assistant", "content": answer})

        timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            started = time.perf_counter()
            await asyncio.gather(*(conversation(c, session) for c in range(CONVERSATIONS)))
            wall = time.perf_counter() - started
        reused = procs.metric(queen, "rbee_prompt_tokens_reused_total")
        prompt_tokens.append(int(procs.metric(queen, "rbee_tokens_total", kind="prompt")))
        decisions = {r: procs.metric(queen, "rbee_routing_decisions_total", reason=r)
                     for r in ("prefix_hit", "load_guard", "least_busy")}
    finally:
        queen.stop()
    ordered = sorted(ttfts)
    return {
        "median_ttft_s": median(ttfts),
        "p90_ttft_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] if ordered else float("nan"),
        "tokens_per_s": tokens / wall if wall else 0.0,
        "wall_s": wall,
        "reused": reused,
        "prompt_tokens": prompt_tokens[0] if prompt_tokens else 0,
        **{f"decisions_{k}": v for k, v in decisions.items()},
    }


async def load_run() -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="rbee-bench-load-"))
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    own: list[float] = []
    on_demand: list[float] = []
    queen = start_fleet(tmp, prefix=True, workers=[],
                        models='[models.smollm2]\nthreads = 1\nctx_size = 1024\nslots = 1\nidle_ttl_s = 0\n')
    try:
        headers = procs.admin_headers(tmp / "home")
        async with aiohttp.ClientSession() as session:
            jobs = JobClient(session, queen.url, headers)
            for i in range(LOAD_ROUNDS):
                # The worker's own load: start it by hand, poll it until ready, ask it straight.
                started = time.perf_counter()
                worker = procs.start_worker(tmp / f"own{i}", threads=1, ctx_size=1024, slots=1, wait=False)
                try:
                    await asyncio.to_thread(procs.wait_worker_ready, worker, 120.0)
                    await first_token(session, f"{worker.url}/v1/chat/completions", body)
                    own.append(time.perf_counter() - started)
                finally:
                    worker.stop()
                # Through the queen: the first request for the model, which no worker runs.
                started = time.perf_counter()
                await first_token(session, f"{queen.url}/v1/chat/completions", body)
                on_demand.append(time.perf_counter() - started)
                _, listed, _ = procs.http_json(f"{queen.url}/v1/workers")
                for w in listed["workers"]:
                    await jobs.run(WorkerStopOp(hive="localhost", worker_id=w["heartbeat"]["worker_id"]))
                await asyncio.to_thread(procs.wait_until, lambda: not procs.http_json(f"{queen.url}/v1/workers")[1]["workers"],
                                        30, "the worker to be gone")
    finally:
        queen.stop()
    return {"own_s": statistics.median(own), "on_demand_s": statistics.median(on_demand),
            "own_all": own, "on_demand_all": on_demand}


def main() -> None:
    scaled = (CONVERSATIONS, TURNS, SYSTEM_TOKENS, AT_ONCE) != ISSUE
    header(f"multi-turn chat: {CONVERSATIONS} conversations x {TURNS} turns, {SYSTEM_TOKENS}-token shared system "
           f"prompt, {AT_ONCE} at a time, 2 workers (1 thread each)")
    if scaled:
        print(f"  (scaled down from the issue's {ISSUE[0]} x {ISSUE[1]} turns, {ISSUE[2]} tokens, {ISSUE[3]} at a "
              "time, to finish on this machine)")
    base = asyncio.run(chat_run(prefix=False))
    pref = asyncio.run(chat_run(prefix=True))
    for label, r in (("least-busy routing", base), ("prefix routing", pref)):
        row(f"{label}: ttft turns 2+ median / p90", f"{r['median_ttft_s'] * 1000:.0f} / {r['p90_ttft_s'] * 1000:.0f} ms")
        row(f"{label}: tokens/s summed (wall)", f"{r['tokens_per_s']:.1f} ({r['wall_s']:.1f} s)")
        row(f"{label}: prompt tokens reused from cache",
            f"{r['reused']:.0f} of {r['prompt_tokens']}")
        row(f"{label}: decisions prefix_hit / load_guard / least_busy",
            f"{r['decisions_prefix_hit']:.0f} / {r['decisions_load_guard']:.0f} / {r['decisions_least_busy']:.0f}")
    ratio = base["median_ttft_s"] / pref["median_ttft_s"] if pref["median_ttft_s"] else float("nan")
    row("median ttft, least-busy / prefix (target >= 3x)", f"{ratio:.2f}x")
    row("p90 ttft, least-busy / prefix", f"{base['p90_ttft_s'] / pref['p90_ttft_s']:.2f}x")
    row("tokens/s, prefix / least-busy (target >= 1.0)", f"{pref['tokens_per_s'] / base['tokens_per_s']:.2f}")

    header(f"on-demand load: first request to first token, median of {LOAD_ROUNDS}")
    load = asyncio.run(load_run())
    row("the worker's own: start, ready, first token", f"{load['own_s'] * 1000:.0f} ms  "
        f"({', '.join(f'{x * 1000:.0f}' for x in load['own_all'])})")
    row("through the queen, model not loaded", f"{load['on_demand_s'] * 1000:.0f} ms  "
        f"({', '.join(f'{x * 1000:.0f}' for x in load['on_demand_all'])})")
    row("overhead (target < 1 s)", f"{(load['on_demand_s'] - load['own_s']) * 1000:+.0f} ms")


if __name__ == "__main__":
    main()
