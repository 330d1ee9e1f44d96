"""Scheduling: fewest in flight for the slots, random ties, leases that cannot drift, bounded waits."""

import asyncio
import collections

import pytest

from rbee_fleet.common.errors import ModelNotFound, RateLimited, Unavailable
from rbee_fleet.contracts.fleet import WorkerHeartbeat, WorkerState
from rbee_fleet.queen.registry import Registry
from rbee_fleet.queen.scheduler import NoOtherWorker, Scheduler


def hb(wid: str, model: str = "m", slots: int = 1, state: WorkerState = WorkerState.READY) -> WorkerHeartbeat:
    return WorkerHeartbeat(worker_id=wid, hive_id="h", model=model, backend="llamacpp", device="cpu",
                           url=f"http://127.0.0.1/{wid}", state=state, slots_total=slots)


def fleet(*beats: WorkerHeartbeat, timeout: float = 10.0, admission: float = 0.5, max_waiting: int = 8):
    reg = Registry(timeout)
    for b in beats:
        reg.worker_heartbeat(b)
    return reg, Scheduler(reg, admission, max_waiting)


async def test_least_loaded_relative_to_slots():
    reg, sched = fleet(hb("a", slots=1), hb("b", slots=4))
    leases = [await sched.acquire("m") for _ in range(4)]
    # b has 4 slots: it takes 3 of the first 4 requests (a gets one, then is full at 1/1).
    counts = collections.Counter(lease.record.id for lease in leases)
    assert counts == {"a": 1, "b": 3}
    for lease in leases:
        lease.release()
    assert reg.workers["a"].in_flight == 0 and reg.workers["b"].in_flight == 0


async def test_ties_are_broken_at_random():
    _, sched = fleet(hb("a"), hb("b"), hb("c"))
    picks = collections.Counter()
    for _ in range(300):
        lease = await sched.acquire("m")
        picks[lease.record.id] += 1
        lease.release()
    assert set(picks) == {"a", "b", "c"} and min(picks.values()) > 50


async def test_release_is_idempotent_and_counters_never_drift():
    reg, sched = fleet(hb("a", slots=2))
    lease = await sched.acquire("m")
    lease.release()
    lease.release()
    assert reg.workers["a"].in_flight == 0


async def test_unknown_model_is_404():
    _, sched = fleet(hb("a"))
    with pytest.raises(ModelNotFound) as info:
        await sched.acquire("other")
    assert info.value.status == 404 and info.value.code == "model_not_found"


async def test_waits_for_a_slot_then_gets_it():
    _, sched = fleet(hb("a"), admission=5)
    first = await sched.acquire("m")
    waiter = asyncio.create_task(sched.acquire("m"))
    await asyncio.sleep(0.05)
    assert not waiter.done() and sched.waiting == 1
    first.release()
    second = await asyncio.wait_for(waiter, 1)
    assert second.record.id == "a"
    second.release()


async def test_bounded_wait_ends_in_503_with_retry_after():
    _, sched = fleet(hb("a"), admission=0.2)
    held = await sched.acquire("m")
    with pytest.raises(Unavailable) as info:
        await sched.acquire("m")
    assert info.value.status == 503 and "Retry-After" in info.value.headers()
    held.release()
    assert sched.waiting == 0


async def test_too_many_waiting_is_429():
    _, sched = fleet(hb("a"), admission=2, max_waiting=1)
    held = await sched.acquire("m")
    waiter = asyncio.create_task(sched.acquire("m"))
    await asyncio.sleep(0.05)
    with pytest.raises(RateLimited) as info:
        await sched.acquire("m")
    assert info.value.status == 429 and int(info.value.headers()["Retry-After"]) >= 1
    held.release()
    (await waiter).release()


async def test_silent_worker_leaves_rotation_and_comes_back():
    reg, sched = fleet(hb("a"), timeout=0.2, admission=0.1)
    await asyncio.sleep(0.3)
    assert reg.serving("m") == []
    with pytest.raises(Unavailable):
        await sched.acquire("m")
    reg.worker_heartbeat(hb("a"))
    lease = await sched.acquire("m")
    assert lease.record.id == "a"
    lease.release()


async def test_loading_worker_is_known_but_not_in_rotation_until_ready():
    reg, sched = fleet(hb("a", state=WorkerState.LOADING), admission=2)
    waiter = asyncio.create_task(sched.acquire("m"))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    reg.worker_heartbeat(hb("a"))
    lease = await asyncio.wait_for(waiter, 1)
    assert lease.record.id == "a"
    lease.release()


async def test_retry_excludes_the_failed_worker():
    _, sched = fleet(hb("a"), hb("b"))
    lease = await sched.acquire("m", exclude={"a"})
    assert lease.record.id == "b"
    lease.release()
    with pytest.raises(NoOtherWorker):
        await sched.acquire("m", exclude={"a", "b"})


async def test_stopped_heartbeat_removes_the_worker():
    reg, _ = fleet(hb("a"))
    reg.worker_heartbeat(hb("a", state=WorkerState.STOPPED))
    assert "a" not in reg.workers


async def test_late_heartbeat_of_a_stopped_instance_is_ignored_but_a_restart_is_not():
    reg, _ = fleet()
    beat = hb("a").model_copy(update={"pid": 10, "started_at": 1.0})
    reg.worker_heartbeat(beat)
    reg.worker_heartbeat(beat.model_copy(update={"state": WorkerState.STOPPED}))
    reg.worker_heartbeat(beat.model_copy(update={"state": WorkerState.DRAINING}))  # was already on the wire
    assert "a" not in reg.workers
    reg.worker_heartbeat(beat.model_copy(update={"pid": 11, "started_at": 2.0}))  # restarted: a new instance
    assert "a" in reg.workers


async def test_waiters_are_served_in_arrival_order_and_newcomers_queue_behind():
    _, sched = fleet(hb("a"), admission=5)
    held = await sched.acquire("m")
    first = asyncio.create_task(sched.acquire("m"))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(sched.acquire("m"))
    await asyncio.sleep(0.01)
    held.release()
    newcomer = asyncio.create_task(sched.acquire("m"))  # arrives as the slot frees: must not jump the queue
    lease = await asyncio.wait_for(first, 1)
    await asyncio.sleep(0.01)
    assert not second.done() and not newcomer.done() and sched.waiting == 2
    lease.release()
    lease = await asyncio.wait_for(second, 1)
    await asyncio.sleep(0.01)
    assert not newcomer.done()
    lease.release()
    (await asyncio.wait_for(newcomer, 1)).release()
    assert sched.waiting == 0


async def test_waiters_for_another_model_do_not_hold_up_a_free_worker():
    _, sched = fleet(hb("a", model="m"), hb("b", model="n"), admission=5)
    held = await sched.acquire("m")
    waiting_for_m = asyncio.create_task(sched.acquire("m"))
    await asyncio.sleep(0.01)
    lease = await asyncio.wait_for(sched.acquire("n"), 1)
    assert lease.record.id == "b" and not waiting_for_m.done()
    lease.release()
    held.release()
    (await asyncio.wait_for(waiting_for_m, 1)).release()


def incarnation(wid: str, pid: int, slots: int = 1) -> WorkerHeartbeat:
    return hb(wid, slots=slots).model_copy(update={"pid": pid, "started_at": float(pid)})


async def test_a_restarted_worker_is_a_new_instance_that_starts_with_nothing_in_flight():
    reg, sched = fleet(incarnation("a", 10, slots=2))
    old = await sched.acquire("m")
    assert reg.workers["a"].in_flight == 1
    reg.worker_heartbeat(incarnation("a", 11, slots=2))  # killed and restarted by its hive
    assert reg.workers["a"].in_flight == 0 and reg.workers["a"] is not old.record
    new = await sched.acquire("m")
    old.release()  # the dead process's request ends: it gives back its own instance's slot only
    assert reg.workers["a"].in_flight == 1 and old.record.in_flight == 0
    new.release()
    assert reg.workers["a"].in_flight == 0


async def test_a_retry_excludes_the_failed_process_not_its_id():
    reg, sched = fleet(incarnation("a", 10))
    failed = reg.workers["a"].instance
    with pytest.raises(NoOtherWorker):
        await sched.acquire("m", exclude={failed})
    reg.worker_heartbeat(incarnation("a", 11))  # the hive restarted it under the same id
    lease = await asyncio.wait_for(sched.acquire("m", exclude={failed}), 1)
    assert lease.record.instance == ("a", 11, 11.0)
    lease.release()


async def test_a_retry_waiting_for_another_worker_never_keeps_a_newcomer_off_a_free_one():
    reg, sched = fleet(incarnation("a", 10), incarnation("b", 20), admission=5)
    held = await sched.acquire("m", exclude={reg.workers["a"].instance})  # b is busy
    assert held.record.id == "b"
    a_failed = reg.workers["a"].instance
    retry = asyncio.create_task(sched.acquire("m", exclude={a_failed}))  # a failed for it: it waits for b
    await asyncio.sleep(0.01)
    assert not retry.done() and sched.waiting == 1
    newcomer = await asyncio.wait_for(sched.acquire("m"), 0.5)  # a's slot is free and the retry cannot use it
    assert newcomer.record.id == "a"
    newcomer.release()
    held.release()
    lease = await asyncio.wait_for(retry, 1)
    assert lease.record.id == "b"
    lease.release()


async def test_a_waiter_that_can_use_the_free_slot_still_goes_before_a_newcomer():
    reg, sched = fleet(incarnation("a", 10), incarnation("b", 20), admission=5)
    on_a = await sched.acquire("m", exclude={"b"})
    on_b = await sched.acquire("m", exclude={"a"})
    b_failed = reg.workers["b"].instance
    retry = asyncio.create_task(sched.acquire("m", exclude={b_failed}))  # can use a only
    plain = asyncio.create_task(sched.acquire("m"))  # can use either
    await asyncio.sleep(0.01)
    on_a.release()  # a frees: the retry (first in line, and a is all it can use) takes it
    lease = await asyncio.wait_for(retry, 1)
    assert lease.record.id == "a" and not plain.done()
    on_b.release()
    (await asyncio.wait_for(plain, 1)).release()
    lease.release()
    assert reg.workers["a"].in_flight == 0 and reg.workers["b"].in_flight == 0


async def test_closing_refuses_waiters_and_newcomers_with_503():
    _, sched = fleet(hb("a"), admission=5)
    held = await sched.acquire("m")
    waiter = asyncio.create_task(sched.acquire("m"))
    await asyncio.sleep(0.01)
    sched.close("shutting down")
    with pytest.raises(Unavailable) as info:
        await asyncio.wait_for(waiter, 1)
    assert info.value.code == "shutting_down" and "Retry-After" in info.value.headers()
    with pytest.raises(Unavailable):
        await sched.acquire("m")
    held.release()
    assert sched.waiting == 0


async def test_a_late_goodbye_of_an_old_process_leaves_its_successor_alone():
    reg, _ = fleet(incarnation("a", 10))
    reg.worker_heartbeat(incarnation("a", 11))
    reg.worker_heartbeat(incarnation("a", 10).model_copy(update={"state": WorkerState.STOPPED}))
    assert reg.workers["a"].instance == ("a", 11, 11.0)
