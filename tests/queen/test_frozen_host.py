"""A frozen host leaves rotation within seconds, by its workers' pulses; a slow but live worker is never cut.

Real queen, real llama-server workers on the real model. A host is frozen by stopping its worker's whole
process group (the worker and its llama-server), as a paused VM or container would be.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import openai
import pytest

from rbee_fleet.contracts.fleet import WorkerHeartbeat, WorkerPulse, WorkerState
from rbee_fleet.queen.registry import Registry
from tests.support import procs

DEFAULT_CADENCE = {"heartbeat_interval_s = 0.5": "heartbeat_interval_s = 5.0",
                   "heartbeat_timeout_s = 2.0": "heartbeat_timeout_s = 15.0"}


def queen_with_default_heartbeats(tmp: Path, extra: str = "") -> tuple[procs.Proc, Path]:
    port = procs.free_port()
    inv = procs.write_inventory(tmp / "inv.toml", port=port, worker_port_base=procs.free_port_range(5), workers=[],
                                queen_extra=f"on_demand = false\n{extra}")
    text = inv.read_text()
    for old, new in DEFAULT_CADENCE.items():
        assert old in text
        text = text.replace(old, new)
    inv.write_text(text.replace("admission_timeout_s = 5", "admission_timeout_s = 30"))
    home = tmp / "home"
    return procs.start_queen(tmp, inv, home, port), home


def ready_ids(queen: procs.Proc) -> set[str]:
    body = procs.http_json(f"{queen.url}/v1/workers")[1]
    return {w["heartbeat"]["worker_id"] for w in body["workers"] if w["live"] and w["heartbeat"]["state"] == "ready"}


def heartbeat(worker_id: str = "w", pid: int = 7, started_at: float = 1.0) -> WorkerHeartbeat:
    return WorkerHeartbeat(worker_id=worker_id, hive_id="h", model="m", backend="llamacpp", device="cpu",
                           url="http://127.0.0.1:1", state=WorkerState.READY, pid=pid, started_at=started_at)


def test_pulses_shorten_the_silence_a_worker_is_allowed_and_name_their_process():
    reg = Registry(15.0, pulse_timeout_s=4.0)
    reg.worker_heartbeat(heartbeat())
    rec = reg.workers["w"]
    assert reg.timeout_of(rec) == 15.0  # no pulse yet: an older worker keeps the heartbeat timeout
    assert reg.worker_pulse(WorkerPulse(worker_id="w", pid=7, started_at=1.0))
    assert reg.timeout_of(rec) == 4.0
    rec.last_seen -= 5.0
    assert not reg.is_live(rec) and not reg.serving("m")
    assert reg.worker_pulse(WorkerPulse(worker_id="w", pid=7, started_at=1.0)) and reg.serving("m") == [rec]
    # Another process under the same id, or an unknown worker: the queen asks for a full heartbeat.
    assert not reg.worker_pulse(WorkerPulse(worker_id="w", pid=8, started_at=2.0))
    assert not reg.worker_pulse(WorkerPulse(worker_id="nobody", pid=7, started_at=1.0))
    # The pulse timeout never lengthens a short heartbeat timeout.
    assert Registry(2.0, pulse_timeout_s=4.0).timeout_of(rec) == 2.0


@pytest.fixture
def two_workers(tmp_path):
    queen, home = queen_with_default_heartbeats(tmp_path)
    token = str(home / "secrets" / "cluster.token")
    workers = []
    try:
        for wid in ("frozen", "alive"):
            workers.append(procs.start_worker(tmp_path, queen_url=queen.url, worker_id=wid, token_file=token,
                                              heartbeat_interval=5.0, threads=1))
        procs.wait_until(lambda: ready_ids(queen) == {"frozen", "alive"}, 30, what="both workers in rotation")
        yield queen, workers
    finally:
        for w in workers:
            os.killpg(w.pid, signal.SIGCONT)
            w.stop()
        queen.stop()


async def test_requests_sent_to_a_frozen_host_are_answered_elsewhere_within_seconds(two_workers):
    queen, (frozen, _) = two_workers
    client = openai.AsyncOpenAI(base_url=f"{queen.url}/v1", api_key="x", max_retries=0, timeout=60)
    os.killpg(frozen.pid, signal.SIGSTOP)  # the host freezes; the queen has not noticed yet
    started = time.monotonic()
    answers = await asyncio.gather(*(
        client.completions.create(model="smollm2", prompt=f"Count to {n}: 1, 2,", max_tokens=4, temperature=0)
        for n in range(6)))
    wall = time.monotonic() - started
    assert all(a.choices[0].text for a in answers)
    log = queen.log_text()
    assert "worker frozen failed before answering" in log, "no request went to the frozen worker: nothing was tested"
    assert "no heartbeat or pulse" in log
    # Heartbeats alone (every 5 s, 15 s timeout) would have held those requests for 15 s or more.
    assert wall < 12, f"requests sent to the frozen host waited {wall:.1f} s"
    assert "frozen" not in ready_ids(queen)
    os.killpg(frozen.pid, signal.SIGCONT)  # it thaws: its next pulse puts it back
    procs.wait_until(lambda: "frozen" in ready_ids(queen), 10, what="the thawed worker back in rotation")


async def test_a_long_prompt_on_a_live_worker_outlasts_the_pulse_timeout_uncut(tmp_path):
    queen, home = queen_with_default_heartbeats(tmp_path, "pulse_interval_s = 0.25\npulse_timeout_s = 1.0")
    worker = procs.start_worker(tmp_path, queen_url=queen.url, worker_id="slow", ctx_size=4096, slots=1, threads=1,
                                token_file=str(home / "secrets" / "cluster.token"), heartbeat_interval=5.0)
    try:
        procs.wait_until(lambda: "slow" in ready_ids(queen), 30, what="the worker in rotation")
        client = openai.AsyncOpenAI(base_url=f"{queen.url}/v1", api_key="x", max_retries=0, timeout=120)
        prompt = "".join(f"Line {i}: the bee visits flower number {i * 7} and hums. " for i in range(120))
        started = time.monotonic()
        stream = await client.completions.create(model="smollm2", prompt=prompt, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        first_at, usage = None, None
        async for chunk in stream:
            if first_at is None and chunk.choices:
                first_at = time.monotonic() - started
            usage = chunk.usage or usage
        assert first_at is not None and usage is not None and usage.completion_tokens >= 1
        assert usage.prompt_tokens > 2000
        # The prompt kept the worker's engine busy past the pulse timeout: only its pulses kept it in.
        assert first_at > 1.0, f"the prompt took {first_at:.2f} s: too short to prove anything"
        assert "no heartbeat or pulse" not in queen.log_text()
    finally:
        worker.stop()
        queen.stop()
