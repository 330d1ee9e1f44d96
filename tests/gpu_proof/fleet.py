"""The proof's fleet side: a real queen (with its embedded hive) and a real exllamav2 worker, driven over HTTP.

Only aiohttp and the standard library: the proof talks to the fleet as any client does (the job API
with the cluster token, the OpenAI endpoints, ``/v1/workers``), so it checks the installed wheel from
outside and never imports ``rbee_fleet`` itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

MODEL = "kit-tiny"
PROMPT = "Write a long story about the bees of a mountain village."  # the same as direct.py's


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def inventory(port: int, worker_port_base: int) -> str:
    """A queen on loopback with its embedded hive and no declared workers (the proof spawns one)."""
    return "\n".join([
        "[queen]", 'host = "127.0.0.1"', f"port = {port}", "heartbeat_interval_s = 0.5",
        "heartbeat_timeout_s = 10", "admission_timeout_s = 120", "max_waiting = 64", "",
        "[defaults]", f"worker_port_base = {worker_port_base}", "",
        "[hives.localhost]", "embedded = true", 'address = "127.0.0.1"', "",
    ])


class FleetError(RuntimeError):
    pass


async def sse_data(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The ``data`` of each event of an SSE response (comments skipped)."""
    lines: list[str] = []
    async for raw in resp.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            lines.append(line[5:].lstrip(" "))
    if lines:
        yield "\n".join(lines)


@dataclass
class Queen:
    url: str
    home: Path
    process: subprocess.Popen[bytes]
    log: Path
    model: str = MODEL  # what the OpenAI requests ask for

    @property
    def admin(self) -> dict[str, str]:
        """What an operator sends to start jobs: the cluster token of the queen's home."""
        return {"Authorization": f"Bearer {(self.home / 'secrets' / 'cluster.token').read_text().strip()}"}

    def stop(self, grace: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


def start_queen(command: list[str], work: Path, env: dict[str, str]) -> Queen:
    """Start ``queen-rbee`` in ``work`` (never in the checkout, whose sources would shadow the wheel)."""
    port = free_port()
    home = work / "home"
    inv = work / "inventory.toml"
    inv.write_text(inventory(port, free_port() + 1))
    log = work / "queen.log"
    with open(log, "ab") as fh:
        process = subprocess.Popen([*command, "--inventory", str(inv), "--home", str(home)], cwd=work, env=env,
                                   stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return Queen(f"http://127.0.0.1:{port}", home, process, log)


async def wait_healthy(session: aiohttp.ClientSession, queen: Queen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if queen.process.poll() is not None:
            raise FleetError(f"queen-rbee exited with {queen.process.returncode} (see queen.log)")
        try:
            async with session.get(f"{queen.url}/health") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise FleetError(f"queen-rbee did not answer /health within {timeout:.0f} s")
        await asyncio.sleep(0.2)


async def run_job(session: aiohttp.ClientSession, queen: Queen, operation: dict[str, Any]) -> dict[str, Any]:
    """POST /v1/jobs, follow its event stream, return the result; raise with the job's own error."""
    async with session.post(f"{queen.url}/v1/jobs", json={"operation": operation}, headers=queen.admin) as resp:
        body = await resp.json(content_type=None)
        if resp.status >= 400:
            raise FleetError(f"POST /v1/jobs answered {resp.status}: {body}")
    job_id = body["job_id"]
    progress: list[str] = []
    async with session.get(f"{queen.url}/v1/jobs/{job_id}/stream", params={"after": "-1"}, headers=queen.admin) as resp:
        async for data in sse_data(resp):
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event["type"] == "result":
                return event.get("data") or {}
            if event["type"] in ("error", "cancelled"):
                raise FleetError(f"job {operation['kind']} failed: {event.get('message')}")
            if event.get("message"):
                progress.append(event["message"])
    raise FleetError(f"job {job_id} ended without a result; last events: {progress[-3:]}")


async def workers(session: aiohttp.ClientSession, queen: Queen) -> list[dict[str, Any]]:
    async with session.get(f"{queen.url}/v1/workers") as resp:
        return (await resp.json(content_type=None))["workers"]


async def heartbeat(session: aiohttp.ClientSession, queen: Queen) -> dict[str, Any]:
    live = [w for w in await workers(session, queen) if w["live"]]
    if not live:
        raise FleetError("the queen has no live worker")
    return live[0]["heartbeat"]


async def wait_ready(session: aiohttp.ClientSession, queen: Queen, timeout: float) -> dict[str, Any]:
    """The first heartbeat that says ready: the hive's job ends when the worker answers, a heartbeat may lag."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            hb = await heartbeat(session, queen)
            if hb.get("state") == "ready":
                return hb
        except FleetError:
            hb = {}
        if time.monotonic() > deadline:
            raise FleetError(f"no heartbeat said ready within {timeout:.0f} s (last: {hb.get('state', 'none')})")
        await asyncio.sleep(0.1)


@dataclass
class Answer:
    """One chat completion streamed through the queen, timed on arrival of each chunk."""

    status: int
    ttft_ms: float | None = None
    decode_tok_s: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    content_chunks: int = 0
    finish_reason: str | None = None
    text: str = ""
    error: dict[str, Any] | None = None
    cut: bool = False  # the client closed the stream on purpose
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "text"} | {"text": self.text[:120]}


async def chat(session: aiohttp.ClientSession, queen: Queen, *, max_tokens: int, temperature: float = 0.0,
               content: str = PROMPT, cut_after: int | None = None) -> Answer:
    """Stream one chat completion; with ``cut_after``, close the connection after that many content chunks."""
    body = {"model": queen.model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = last = None
    parts: list[str] = []
    async with session.post(f"{queen.url}/v1/chat/completions", json=body) as resp:
        answer = Answer(status=resp.status)
        if resp.status != 200:
            answer.error = (await resp.json(content_type=None)).get("error")
            answer.seconds = time.perf_counter() - started
            return answer
        async for data in sse_data(resp):
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                answer.error = chunk["error"]
                break
            if chunk.get("usage"):
                answer.completion_tokens = chunk["usage"]["completion_tokens"]
                answer.prompt_tokens = chunk["usage"]["prompt_tokens"]
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    parts.append(choice["delta"]["content"])
                    answer.content_chunks += 1
                if choice.get("finish_reason"):
                    answer.finish_reason = choice["finish_reason"]
            if cut_after is not None and answer.content_chunks >= cut_after:
                answer.cut = True
                resp.close()
                break
    answer.seconds = time.perf_counter() - started
    answer.text = "".join(parts)
    if first is not None:
        answer.ttft_ms = round(1000 * (first - started), 2)
        if last is not None and last > first and answer.completion_tokens > 1:
            answer.decode_tok_s = round((answer.completion_tokens - 1) / (last - first), 1)
    return answer


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 2) if known else None


@dataclass
class Outcome:
    """What one fleet check found: pass or fail, a one-line detail, and the figures behind it."""

    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


async def single_streams(session: aiohttp.ClientSession, queen: Queen, runs: int, max_tokens: int) -> Outcome:
    answers = [await chat(session, queen, max_tokens=max_tokens) for _ in range(runs)]
    bad = [a for a in answers if a.status != 200 or a.error or not a.text or a.completion_tokens != max_tokens]
    data = {"runs": [a.summary() for a in answers], "ttft_ms_median": median([a.ttft_ms for a in answers]),
            "decode_tok_s_median": median([a.decode_tok_s for a in answers])}
    if bad:
        return Outcome(False, f"{len(bad)} of {runs} streams failed or came short: {bad[0].summary()}", data)
    return Outcome(True, f"{runs} greedy streams of {max_tokens} tokens: first token {data['ttft_ms_median']} ms, "
                         f"{data['decode_tok_s_median']} tok/s decode (medians); text {answers[0].text[:60]!r}", data)


async def concurrent_streams(session: aiohttp.ClientSession, queen: Queen, n: int, max_tokens: int) -> Outcome:
    hb = await heartbeat(session, queen)
    started = time.perf_counter()
    answers = await asyncio.gather(*(chat(session, queen, max_tokens=max_tokens, temperature=0.7,
                                          content=f"{PROMPT} Number {i}.") for i in range(n)))
    wall = time.perf_counter() - started
    tokens = sum(a.completion_tokens for a in answers)
    slots = hb.get("slots_total", 1)
    mode = f"continuous batching ({slots} slots, paged attention)" if slots > 1 else "batch 1 (no paged attention: requests queue)"
    ttfts = sorted(a.ttft_ms for a in answers if a.ttft_ms is not None)
    data = {"streams": n, "tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1) if wall else None,
            "slots_total": slots, "mode": mode, "ttft_ms": ttfts, "answers": [a.summary() for a in answers]}
    bad = [a for a in answers if a.status != 200 or a.error or not a.text]
    if bad:
        return Outcome(False, f"{len(bad)} of {n} concurrent streams failed: {bad[0].summary()}", data)
    return Outcome(True, f"{n} streams, {tokens} tokens in {wall:.2f} s ({data['tok_s']} tok/s together), {mode}; "
                         f"first tokens {ttfts[0]:.0f} to {ttfts[-1]:.0f} ms", data)


async def wait_cache_free(session: aiohttp.ClientSession, queen: Queen, timeout: float) -> dict[str, Any]:
    """The first heartbeat that shows the whole cache free and no slot busy."""
    deadline = time.monotonic() + timeout
    hb = await heartbeat(session, queen)
    while not (hb.get("cache_tokens_free") == hb.get("cache_tokens_total") and hb.get("slots_busy") == 0):
        if time.monotonic() > deadline:
            raise FleetError(f"after {timeout:.0f} s the cache is still not free: {json.dumps(hb)}")
        await asyncio.sleep(0.1)
        hb = await heartbeat(session, queen)
    return hb


async def cancel_mid_stream(session: aiohttp.ClientSession, queen: Queen, max_tokens: int) -> Outcome:
    hb = await heartbeat(session, queen)
    if not hb.get("cache_tokens_total") or hb.get("cache_tokens_free") is None:
        return Outcome(False, f"the worker reports no cache figures ({hb.get('backend')} backend), so its return "
                              "cannot be seen", {"heartbeat": hb})
    before = await wait_cache_free(session, queen, 30)
    answer = await chat(session, queen, max_tokens=max_tokens, cut_after=10)
    cut_at = time.monotonic()
    after = await wait_cache_free(session, queen, 30)
    await asyncio.sleep(1.5)  # three more heartbeats: a generation still running would show in the count
    settled = await heartbeat(session, queen)
    decoded = settled["tokens_decoded_total"] - before["tokens_decoded_total"]
    data = {"max_tokens": max_tokens, "chunks_read": answer.content_chunks, "freed_after_s": round(time.monotonic() - cut_at, 2),
            "tokens_decoded": decoded, "cache_tokens_free": settled.get("cache_tokens_free"),
            "cache_tokens_total": settled.get("cache_tokens_total"), "heartbeat_after": after}
    if not answer.cut:
        return Outcome(False, f"the stream ended before it could be cut: {answer.summary()}", data)
    if settled.get("cache_tokens_free") != settled.get("cache_tokens_total") or decoded >= max_tokens:
        return Outcome(False, f"the cancelled job kept running or kept its cache: decoded {decoded} of {max_tokens}, "
                              f"cache free {settled.get('cache_tokens_free')} of {settled.get('cache_tokens_total')}", data)
    return Outcome(True, f"cut after {answer.content_chunks} chunks; the whole cache ({settled['cache_tokens_total']} tokens) "
                         f"was free again {data['freed_after_s']} s later; {decoded} of {max_tokens} tokens decoded", data)


async def context_overflow(session: aiohttp.ClientSession, queen: Queen) -> Outcome:
    hb = await heartbeat(session, queen)
    cache = int(hb.get("cache_tokens_total") or hb.get("context_length") or 0)
    answer = await chat(session, queen, max_tokens=cache)  # the prompt's tokens on top cannot fit
    code = (answer.error or {}).get("code")
    data = {"cache_tokens_total": cache, "max_tokens": cache, "status": answer.status, "error": answer.error}
    if answer.status == 400 and code == "context_length_exceeded":
        return Outcome(True, f"400 context_length_exceeded before any stream: {(answer.error or {}).get('message')}", data)
    return Outcome(False, f"expected 400 context_length_exceeded, got {answer.status} {answer.error}", data)
