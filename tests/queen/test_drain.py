"""Graceful shutdown of a real queen with streams in flight: they finish or end with an error event, never a reset."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.support import procs

DRAIN_TIMEOUT_S = 10.0


@pytest.fixture
def fleet(tmp_path: Path):
    """A queen with two one-slot CPU workers and a short drain timeout."""
    port = procs.free_port()
    inv = procs.write_inventory(tmp_path / "inv.toml", port=port, worker_port_base=procs.free_port_range(8),
                                workers=[{"model": "smollm2", "threads": 1, "ctx_size": 1024, "count": 2, "slots": 1}],
                                queen_extra=f"drain_timeout_s = {DRAIN_TIMEOUT_S}\npulse_timeout_s = 10.0")
    # Not a liveness test: the tests' 2-second heartbeat timeout would let a worker starved of CPU for two
    # seconds on a busy CI machine (two one-thread workers, the queen and this client on 2 cores) drop out
    # of rotation and change the counts this test reads.
    inv.write_text(inv.read_text().replace("admission_timeout_s = 5", "admission_timeout_s = 60")
                   .replace("heartbeat_timeout_s = 2.0", "heartbeat_timeout_s = 10.0"))
    queen = procs.start_queen(tmp_path, inv, tmp_path / "home", port)
    procs.wait_workers_ready(queen, 2)
    yield queen
    queen.stop()


async def stream_to_end(client: openai.AsyncOpenAI, max_tokens: int) -> tuple[str, int, str | None]:
    """('done', tokens, finish_reason) or ('error', tokens, the error's code) for one streamed completion."""
    got = 0
    stream = await client.completions.create(model="smollm2", **procs.LONG, max_tokens=max_tokens, stream=True)
    try:
        finish = None
        async for chunk in stream:
            got += 1
            finish = chunk.choices[0].finish_reason if chunk.choices else finish
        return "done", got, finish
    except openai.APIError as exc:
        return "error", got, getattr(exc, "code", None) or (exc.body or {}).get("code")


def queen_view(url: str, **expect: int) -> dict | None:
    """The queen's own counters from /v1/status, once they read as ``expect``."""
    view = procs.http_json(f"{url}/v1/status")[1]["queen"]
    return view if all(view[k] == v for k, v in expect.items()) else None


async def post_status(session: aiohttp.ClientSession, url: str) -> tuple[int, dict, str | None]:
    body = {"model": "smollm2", "prompt": "hi", "max_tokens": 2}
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        return resp.status, await resp.json(), resp.headers.get("Retry-After")


async def test_sigterm_drains_streams_in_flight_and_refuses_the_rest(fleet):
    client = openai.AsyncOpenAI(base_url=f"{fleet.url}/v1", api_key="x", max_retries=0, timeout=120)
    loop = asyncio.get_running_loop()
    # Two streams take both slots: one long (runs past the drain timeout), one that ends within it.
    long = asyncio.create_task(stream_to_end(client, 900))
    short = asyncio.create_task(stream_to_end(client, 30))
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as session:
        queued = [asyncio.create_task(post_status(session, fleet.url)) for _ in range(2)]  # wait for a slot
        status = await asyncio.to_thread(procs.wait_until, lambda: queen_view(fleet.url, waiting=2), 20,
                                         "two requests waiting")
        assert status["in_flight"] == 2
        fleet.popen.send_signal(signal.SIGTERM)
        sent = loop.time()
        refused = await asyncio.wait_for(asyncio.gather(*queued), 5)  # the waiting ones: 503 at once
        newcomer = await post_status(session, fleet.url)  # still listening, refusing
    for code, body, retry_after in [*refused, newcomer]:
        assert code == 503 and int(retry_after) >= 1
        assert body["error"]["code"] == "shutting_down" and body["error"]["type"] == "server_error"

    short_result = await asyncio.wait_for(short, DRAIN_TIMEOUT_S + 5)
    assert short_result[0] == "done" and short_result[2] == "length", short_result
    long_result = await asyncio.wait_for(long, DRAIN_TIMEOUT_S + 10)
    ended = loop.time() - sent
    assert long_result[0] == "error" and long_result[2] == "shutting_down", long_result
    assert long_result[1] > 0  # it was streaming, and was cut by an event, not a broken connection
    assert DRAIN_TIMEOUT_S - 0.5 <= ended < DRAIN_TIMEOUT_S + 5, ended
    # Then the queen stops its workers and exits.
    await asyncio.to_thread(fleet.popen.wait, 40)
    assert fleet.popen.returncode == 0
    log = fleet.log_text()
    assert "draining: 4 request(s) in flight (2 of them waiting" in log and "drain timeout" in log


def test_keeper_down_reports_the_requests_it_waited_for(tmp_path: Path):
    """``rbee-keeper down`` waits for a stream in flight (the drain) and says so."""
    port = procs.free_port()
    inv = procs.write_inventory(tmp_path / "inv.toml", port=port, worker_port_base=procs.free_port_range(5),
                                workers=[{"model": "smollm2", "threads": 2, "ctx_size": 1024}])
    env = {**os.environ, "RBEE_HOME": str(tmp_path / "home")}
    keeper = [sys.executable, "-m", "rbee_fleet.keeper"]
    up = subprocess.run([*keeper, "up", "-i", str(inv)], capture_output=True, text=True, env=env, timeout=180)
    assert up.returncode == 0, up.stderr
    url = f"http://127.0.0.1:{port}"
    try:
        result: dict = {}

        def stream() -> None:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            chunks = client.completions.create(model="smollm2", **procs.LONG, max_tokens=150, stream=True)
            result["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices][-1]

        t = threading.Thread(target=stream)
        t.start()
        procs.wait_until(lambda: queen_view(url, in_flight=1), 20, "a stream in flight")
        started = time.monotonic()
        down = subprocess.run([*keeper, "down", "-i", str(inv)], capture_output=True, text=True, env=env, timeout=120)
        t.join(30)
        assert down.returncode == 0, down.stderr
        assert "waited for 1 request(s) in flight" in down.stdout, down.stdout
        assert result.get("finish") == "length"  # the answer ran to its end before the queen went away
        assert time.monotonic() - started < 60
    finally:
        subprocess.run([*keeper, "down", "-i", str(inv)], capture_output=True, env=env, timeout=120)


def test_a_hive_refuses_new_operations_while_its_workers_finish_their_answers(tmp_path: Path):
    """SIGTERM to a standalone hive: new jobs get 503, its worker finishes the stream it serves, then all exit."""
    port = procs.free_port()
    hive = procs.spawn("hive", [sys.executable, "-m", "rbee_fleet.hive", "--hive-id", "box", "--port", str(port),
                                "--home", str(tmp_path / "hive-home"), "--worker-port-base", str(procs.free_port_range(5))],
                       tmp_path / "hive.log", f"http://127.0.0.1:{port}")
    try:
        procs.wait_until(lambda: hive.alive() and procs.port_open("127.0.0.1", port), 20, what="the hive")
        spawn = {"operation": {"kind": "worker_spawn", "model": "smollm2", "worker_id": "w", "threads": 2, "ctx_size": 1024}}
        status, body, _ = procs.http_json(f"{hive.url}/v1/jobs", method="POST", body=spawn)
        assert status == 202
        def ended() -> dict | None:
            job = procs.http_json(f"{hive.url}/v1/jobs/{body['job_id']}")[1]
            return job if job["state"] != "running" else None

        job = procs.wait_until(ended, 120, what="the worker to start")
        assert job["state"] == "succeeded", job
        worker_url = job["result"]["worker"]["url"]

        result: dict = {}
        streaming = threading.Event()

        def stream() -> None:
            client = openai.OpenAI(base_url=f"{worker_url}/v1", api_key="x", max_retries=0)
            finish = None
            for chunk in client.completions.create(model="smollm2", **procs.LONG, max_tokens=100, stream=True):
                streaming.set()
                finish = chunk.choices[0].finish_reason if chunk.choices else finish
            result["finish"] = finish

        t = threading.Thread(target=stream)
        t.start()
        assert streaming.wait(30), "the stream did not start"
        hive.popen.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        status, body, headers = procs.http_json(f"{hive.url}/v1/jobs", method="POST", body=spawn)
        assert status == 503 and body["error"]["code"] == "shutting_down" and int(headers["Retry-After"]) >= 1
        t.join(60)
        assert result.get("finish") == "length", hive.log_text()[-2000:]  # the answer ran to its end
        assert hive.popen.wait(40) == 0
    finally:
        hive.stop()
