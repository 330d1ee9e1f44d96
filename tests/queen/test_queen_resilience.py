"""The queen under pressure and faults: API keys, full admission, silent workers, its own restart."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.support import procs


def no_workers_inventory(path: Path, port: int, extra: str = "") -> Path:
    return procs.write_inventory(path, port=port, worker_port_base=procs.free_port_range(5), workers=[], queen_extra=extra)


def live_worker_ids(queen, headers=None) -> set[str]:
    body = procs.http_json(f"{queen.url}/v1/workers", headers=headers)[1]
    return {w["heartbeat"]["worker_id"] for w in body["workers"] if w["live"] and w["heartbeat"]["state"] == "ready"}


def test_api_keys_are_required_when_configured(tmp_path):
    port = procs.free_port()
    inv = no_workers_inventory(tmp_path / "inv.toml", port, 'api_keys = ["sk-test-123"]')
    queen = procs.start_queen(tmp_path, inv, tmp_path / "home", port)
    try:
        status, body, _ = procs.http_json(f"{queen.url}/v1/models")
        assert status == 401 and body["error"]["type"] == "authentication_error" and body["error"]["code"] == "invalid_api_key"
        status, _, _ = procs.http_json(f"{queen.url}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert status == 401
        status, body, _ = procs.http_json(f"{queen.url}/v1/models", headers={"Authorization": "Bearer sk-test-123"})
        assert status == 200 and body["object"] == "list"
        status, _, _ = procs.http_json(f"{queen.url}/v1/models", headers={"x-api-key": "sk-test-123"})
        assert status == 200
        status, _, _ = procs.http_json(f"{queen.url}/health")
        assert status == 200  # health needs no key
        assert "sk-test-123" not in queen.log_text()
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{queen.url}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        queen.stop()


def test_queen_refuses_a_non_loopback_bind_without_keys(tmp_path):
    port = procs.free_port()
    inv = no_workers_inventory(tmp_path / "inv.toml", port)
    text = inv.read_text().replace('host = "127.0.0.1"', 'host = "0.0.0.0"', 1)
    inv.write_text(text)
    proc = procs.spawn("queen", [sys.executable, "-m", "rbee_fleet.queen", "-i", str(inv),
                                 "--home", str(tmp_path / "home")], tmp_path / "q.log", "")
    assert proc.popen.wait(30) != 0
    assert "no API key" in proc.log_text()


@pytest.fixture
def one_worker_queen(tmp_path):
    """A queen with one slot in the whole fleet, at most one request waiting, and a 1 s admission wait."""
    port = procs.free_port()
    inv = procs.write_inventory(tmp_path / "inv.toml", port=port, worker_port_base=procs.free_port_range(5),
                                workers=[{"model": "smollm2", "threads": 2, "ctx_size": 1024, "slots": 1}],
                                queen_extra="max_waiting = 1")
    inv.write_text(inv.read_text().replace("admission_timeout_s = 5", "admission_timeout_s = 1"))
    queen = procs.start_queen(tmp_path, inv, tmp_path / "home", port)
    procs.wait_workers_ready(queen, 1)
    yield queen
    queen.stop()


async def test_full_fleet_answers_429_then_503_with_retry_after(one_worker_queen):
    url = f"{one_worker_queen.url}/v1/completions"
    body = {"model": "smollm2", **procs.LONG, "max_tokens": 600, "stream": True}
    async with aiohttp.ClientSession() as session:
        async def hold():
            async with session.post(url, json=body) as resp:
                await resp.content.readline()
                await asyncio.sleep(30)

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0.5)
        waiter = asyncio.create_task(session.post(url, json=body))
        await asyncio.sleep(0.2)
        async with session.post(url, json=body) as resp:  # one is running, one waiting: no room
            first = resp.status, await resp.json(), resp.headers.get("Retry-After")
        resp = await waiter  # waited its 1 s, no slot came free
        second = resp.status, await resp.json(), resp.headers.get("Retry-After")
        resp.release()
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
    assert first[0] == 429 and first[1]["error"]["type"] == "rate_limit_error" and int(first[2]) >= 1
    assert second[0] == 503 and "busy" in second[1]["error"]["message"] and int(second[2]) >= 1
    # The queen's counters came back to zero once the held stream was cut.
    procs.wait_until(lambda: all(w["in_flight"] == 0 for w in procs.http_json(f"{one_worker_queen.url}/v1/workers")[1]["workers"]),
                     10, what="in-flight counters to return to zero")


class QueenAndWorker:
    """A queen with no workers of its own and one standalone worker heartbeating to it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = procs.free_port()
        # The worker's model is in the embedded hive's catalog too: with on-demand loading the queen would
        # start a worker of its own when this one falls silent (see tests/queen/test_on_demand.py).
        self.inv = no_workers_inventory(tmp / "inv.toml", self.port, "on_demand = false")
        self.home = tmp / "home"
        self.queen = procs.start_queen(tmp, self.inv, self.home, self.port)
        self.worker = procs.start_worker(tmp, queen_url=self.queen.url, worker_id="solo",
                                         token_file=str(self.home / "secrets" / "cluster.token"))
        procs.wait_until(lambda: "solo" in live_worker_ids(self.queen), 10, what="registration")

    def restart_queen(self) -> None:
        self.queen.stop()
        self.queen = procs.start_queen(self.tmp, self.inv, self.home, self.port)

    def complete(self) -> tuple[int, dict]:
        status, body, _ = procs.http_json(f"{self.queen.url}/v1/completions", method="POST",
                                          body={"model": "smollm2", "prompt": "hi", "max_tokens": 2})
        return status, body


@pytest.fixture
def pair(tmp_path):
    p = QueenAndWorker(tmp_path)
    yield p
    os.kill(p.worker.pid, signal.SIGCONT)
    p.worker.stop()
    p.queen.stop()


def test_silent_worker_leaves_rotation_and_returns(pair):
    os.kill(pair.worker.pid, signal.SIGSTOP)  # alive but silent, as a hung or paused host would be
    procs.wait_until(lambda: "solo" not in live_worker_ids(pair.queen), 10, what="the silent worker to leave rotation")
    status, body = pair.complete()
    assert status == 503 and "no worker" in body["error"]["message"]
    os.kill(pair.worker.pid, signal.SIGCONT)
    procs.wait_until(lambda: "solo" in live_worker_ids(pair.queen), 10, what="the worker to come back")
    assert pair.complete()[0] == 200


def test_worker_reregisters_after_the_queen_restarts(pair):
    pair.restart_queen()
    procs.wait_until(lambda: "solo" in live_worker_ids(pair.queen), 10, what="re-registration with the new queen")
    status, body = pair.complete()
    assert status == 200 and body["usage"]["completion_tokens"] == 2


async def test_paused_worker_mid_stream_ends_the_stream_instead_of_hanging(pair):
    client = openai.AsyncOpenAI(base_url=f"{pair.queen.url}/v1", api_key="x", max_retries=0)
    stream = await client.completions.create(model="smollm2", **procs.LONG, max_tokens=400, stream=True)
    got = 0
    loop = asyncio.get_running_loop()
    with pytest.raises(openai.APIError) as info:
        async for _ in stream:
            got += 1
            if got == 3:
                os.kill(pair.worker.pid, signal.SIGSTOP)  # a host that froze mid-answer
                paused_at = loop.time()
    waited = loop.time() - paused_at
    assert "no heartbeat" in str(info.value.message)
    # A hang would last the 300 s read timeout; the watchdog ends it about the 2 s heartbeat timeout.
    assert waited < 30, f"the stream hung for {waited:.1f} s"


def test_operations_need_the_cluster_token_and_web_pages_are_refused(tmp_path):
    """A web page's POST (CSRF) or a rebound DNS name must not reach the job API of a loopback queen."""
    port = procs.free_port()
    inv = no_workers_inventory(tmp_path / "inv.toml", port, 'api_keys = ["sk-client"]')
    queen = procs.start_queen(tmp_path, inv, tmp_path / "home", port)
    job = {"operation": {"kind": "model_download", "source": "http://127.0.0.1:1/x.gguf"}}
    try:
        status, body, _ = procs.http_json(f"{queen.url}/v1/jobs", method="POST", body=job,
                                          headers={"Authorization": "Bearer sk-client"})
        assert status == 401, "an inference key does not make its holder an operator"
        admin = procs.admin_headers(tmp_path / "home")
        status, body, _ = procs.http_json(f"{queen.url}/v1/jobs", method="POST", body=job, headers=admin)
        assert status == 202 and body["job_id"]
        status, body, _ = procs.http_json(f"{queen.url}/v1/jobs", method="POST", body=job,
                                          headers={**admin, "Origin": "https://evil.example"})
        assert status == 403 and body["error"]["type"] == "permission_error"
        status, _, _ = procs.http_json(f"{queen.url}/v1/models",
                                       headers={"Authorization": "Bearer sk-client", "Host": "rebound.evil.example"})
        assert status == 403
        status, _, _ = procs.http_json(f"{queen.url}/v1/models",
                                       headers={"Authorization": "Bearer sk-client", "Origin": "http://localhost:3000"})
        assert status == 200  # a page served from this machine may call it
        status, _, _ = procs.http_json(f"{queen.url}/v1/models", headers={"Authorization": "Bearer sk-client"})
        assert status == 200
    finally:
        queen.stop()
