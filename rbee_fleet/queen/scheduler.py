"""Which worker gets a request: the fewest in flight for its slots, ties at random, with a bounded wait.

In-flight counts are the queen's own: a ``Lease`` adds one when a request is placed and takes it back
exactly once when the request ends, however it ends, so the counters cannot drift.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque

from rbee_fleet.common.errors import ModelNotFound, RateLimited, Unavailable
from rbee_fleet.queen.registry import Registry, WorkerRecord


class NoOtherWorker(Exception):
    """A retry found no worker left to try."""


class Lease:
    __slots__ = ("record", "_released", "_scheduler")

    def __init__(self, record: WorkerRecord, scheduler: Scheduler) -> None:
        self.record = record
        self._released = False
        self._scheduler = scheduler
        record.in_flight += 1

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.record.in_flight -= 1
        self._scheduler.wake()


class Scheduler:
    def __init__(self, registry: Registry, admission_timeout_s: float, max_waiting: int) -> None:
        self.registry = registry
        self.admission_timeout_s = admission_timeout_s
        self.max_waiting = max_waiting
        self._waiters: deque[asyncio.Future[None]] = deque()
        registry.on_capacity.append(self.wake)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def wake(self) -> None:
        """Let every waiter look again (in the order they came)."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def pick(self, model: str, exclude: set[str]) -> WorkerRecord | None:
        best: list[WorkerRecord] = []
        best_load = float("inf")
        for rec in self.registry.serving(model):
            if rec.id in exclude or rec.free_slots() <= 0:
                continue
            load = rec.in_flight / max(1, rec.hb.slots_total)
            if load < best_load:
                best, best_load = [rec], load
            elif load == best_load:
                best.append(rec)
        return random.choice(best) if best else None

    async def acquire(self, model: str, exclude: set[str] | None = None) -> Lease:
        exclude = exclude or set()
        if not self.registry.knows(model):
            served = ", ".join(self.registry.models()) or "none yet"
            raise ModelNotFound(f"the model {model!r} does not exist in this fleet (serving: {served})", param="model")
        deadline = time.monotonic() + self.admission_timeout_s
        loop = asyncio.get_running_loop()
        while True:
            rec = self.pick(model, exclude)
            if rec is not None:
                return Lease(rec, self)
            if exclude and not self.registry.others(model, exclude):
                raise NoOtherWorker()
            if len(self._waiters) >= self.max_waiting:
                raise RateLimited(
                    f"{len(self._waiters)} requests are already waiting for a worker; retry later",
                    code="rate_limit_exceeded", retry_after=2,
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._unavailable(model)
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait_for(asyncio.shield(fut), remaining)
            except asyncio.TimeoutError:
                raise self._unavailable(model) from None
            finally:
                if not fut.done():
                    fut.cancel()
                    try:
                        self._waiters.remove(fut)
                    except ValueError:
                        pass

    def _unavailable(self, model: str) -> Unavailable:
        ready = self.registry.serving(model)
        if ready:
            why = f"all {len(ready)} worker(s) of {model!r} stayed busy for {self.admission_timeout_s:.0f} s"
        else:
            why = f"no worker of {model!r} is ready (loading, or missing heartbeats)"
        return Unavailable(why, retry_after=max(1.0, min(10.0, self.admission_timeout_s / 4)))
