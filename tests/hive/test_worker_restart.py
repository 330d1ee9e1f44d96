"""A worker killed under load: its hive restarts it, and the queen uses the new process at once.

Real processes throughout: a queen with its embedded hive and two CPU workers, four clients streaming
without pause through the official ``openai`` client, and ``kill -9`` of one worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import openai
import pytest

from tests.support import procs

CLIENTS = 4


@pytest.fixture
def fleet(tmp_path: Path):
    port = procs.free_port()
    inv = procs.write_inventory(tmp_path / "inv.toml", port=port, worker_port_base=procs.free_port_range(8),
                                workers=[{"model": "smollm2", "threads": 1, "ctx_size": 1024, "count": 2, "slots": 1}])
    inv.write_text(inv.read_text().replace("admission_timeout_s = 5", "admission_timeout_s = 60"))
    queen = procs.start_queen(tmp_path, inv, tmp_path / "home", port)
    procs.wait_workers_ready(queen, 2)
    yield queen
    queen.stop()


async def keep_streaming(client: openai.AsyncOpenAI, stop: asyncio.Event, outcomes: list[str]) -> None:
    while not stop.is_set():
        try:
            stream = await client.completions.create(model="smollm2", **procs.LONG, max_tokens=60, stream=True)
            async for _ in stream:
                pass
            outcomes.append("ok")
        except openai.APIError as exc:  # the stream on the killed worker ends with an error event
            outcomes.append(f"error: {exc.message}")


def snapshot(url: str) -> tuple[float, dict]:
    return time.monotonic(), procs.http_json(f"{url}/v1/status", timeout=5)[1]


async def test_a_restarted_worker_serves_within_a_second_of_being_ready(fleet):
    client = openai.AsyncOpenAI(base_url=f"{fleet.url}/v1", api_key="x", max_retries=0, timeout=120)
    stop = asyncio.Event()
    outcomes: list[str] = []
    clients = [asyncio.create_task(keep_streaming(client, stop, outcomes)) for _ in range(CLIENTS)]
    try:
        await asyncio.to_thread(procs.wait_until, lambda: snapshot(fleet.url)[1]["queen"]["waiting"] >= 1, 30,
                                "requests waiting behind both busy workers")
        victim = snapshot(fleet.url)[1]["workers"][0]["heartbeat"]
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()

        samples: list[tuple[float, dict]] = []
        ready_at = serving_at = None
        while time.monotonic() - killed_at < 60:
            at, status = await asyncio.to_thread(snapshot, fleet.url)
            samples.append((at, status))
            new = [w for w in status["workers"] if w["heartbeat"]["worker_id"] == victim["worker_id"]
                   and w["heartbeat"]["pid"] != victim["pid"] and w["live"] and w["heartbeat"]["state"] == "ready"]
            if new and ready_at is None:
                ready_at = at
            if new and ready_at is not None and new[0]["in_flight"] > 0:
                serving_at = at
                break
            await asyncio.sleep(0.05)
        assert ready_at is not None, "the hive did not restart the worker"
        assert serving_at is not None, "the restarted worker never got a request"
        assert serving_at - ready_at < 1.0, f"the restarted worker sat idle {serving_at - ready_at:.1f} s while ready"
        # Keep sampling a little: from now on, a request never waits while a slot is free.
        for _ in range(40):
            samples.append(await asyncio.to_thread(snapshot, fleet.url))
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), 120)

    after_ready = [(at, st) for at, st in samples if at >= ready_at]
    idle_while_waiting = [at - ready_at for at, st in after_ready if st["queen"]["waiting"] > 0 and any(
        w["live"] and w["heartbeat"]["state"] == "ready" and w["in_flight"] < w["heartbeat"]["slots_total"]
        for w in st["workers"])]
    # A sample can fall between a slot's release and the next waiter taking it; never two in a row.
    assert not any(b - a < 0.3 for a, b in zip(idle_while_waiting, idle_while_waiting[1:])), idle_while_waiting
    assert all(w["in_flight"] >= 0 for _, st in samples for w in st["workers"])
    assert outcomes.count("ok") >= CLIENTS and len([o for o in outcomes if o != "ok"]) <= 2, outcomes
    # The queen's counters come back to exactly zero once the clients stop.
    procs.wait_until(lambda: all(w["in_flight"] == 0 for w in snapshot(fleet.url)[1]["workers"]), 10,
                     what="in-flight counters to return to zero")
