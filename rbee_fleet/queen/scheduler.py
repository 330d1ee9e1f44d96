"""Which worker gets a request: the fewest in flight for its slots, ties at random, with a bounded wait.

In-flight counts are the queen's own: a ``Lease`` adds one when a request is placed and takes it back
exactly once when the request ends, however it ends, so the counters cannot drift.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from rbee_fleet.common.errors import ModelNotFound, RateLimited, Unavailable
from rbee_fleet.queen.registry import Registry, WorkerRecord

# Chooses among the workers that could take a request now (prefix-aware routing); None: least busy.
Route = Callable[[list[WorkerRecord]], WorkerRecord]


class NoOtherWorker(Exception):
    """A retry found no worker left to try."""


@dataclass
class _Waiter:
    ticket: int
    model: str
    fut: asyncio.Future[None]


class Lease:
    __slots__ = ("record", "_released", "_scheduler")

    def __init__(self, record: WorkerRecord, scheduler: Scheduler) -> None:
        self.record = record
        self._released = False
        self._scheduler = scheduler
        record.in_flight += 1
        record.last_used = time.monotonic()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.record.in_flight -= 1
        self.record.last_used = time.monotonic()
        self._scheduler.wake()


class Scheduler:
    def __init__(self, registry: Registry, admission_timeout_s: float, max_waiting: int) -> None:
        self.registry = registry
        self.admission_timeout_s = admission_timeout_s
        self.max_waiting = max_waiting
        self._queue: list[_Waiter] = []  # in arrival order; a waiter leaves it when served or given up
        self._tickets = itertools.count()
        registry.on_capacity.append(self.wake)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def wake(self) -> None:
        """Let every waiter look again; they look in the order they came."""
        for waiter in self._queue:
            if not waiter.fut.done():
                waiter.fut.set_result(None)

    def pick(self, model: str, exclude: set[str], needs: frozenset[str] = frozenset(),
             route: Route | None = None) -> WorkerRecord | None:
        eligible = [rec for rec in self.registry.serving(model)
                    if rec.id not in exclude and rec.free_slots() > 0 and needs <= rec.capabilities]
        if route is not None and eligible:
            return route(eligible)
        best: list[WorkerRecord] = []
        best_load = float("inf")
        for rec in eligible:
            load = rec.in_flight / max(1, rec.hb.slots_total)
            if load < best_load:
                best, best_load = [rec], load
            elif load == best_load:
                best.append(rec)
        return random.choice(best) if best else None

    async def acquire(self, model: str, exclude: set[str] | None = None,
                      needs: frozenset[str] = frozenset(), route: Route | None = None) -> Lease:
        """A slot on a worker of ``model``: at once, or after the requests that came first (FIFO per model).

        A retry (``exclude`` set) was admitted before and does not queue behind newcomers.
        """
        exclude = exclude or set()
        if not self.registry.knows(model):
            served = ", ".join(self.registry.models()) or "none yet"
            raise ModelNotFound(f"the model {model!r} does not exist in this fleet (serving: {served})", param="model")
        deadline = time.monotonic() + self.admission_timeout_s
        loop = asyncio.get_running_loop()
        me = _Waiter(next(self._tickets), model, loop.create_future())
        queued = False
        try:
            while True:
                first = exclude or not any(w.model == model and w.ticket < me.ticket for w in self._queue)
                rec = self.pick(model, exclude, needs, route) if first else None
                if rec is not None:
                    return Lease(rec, self)
                if exclude and not self.registry.others(model, exclude):
                    raise NoOtherWorker()
                if not queued and len(self._queue) >= self.max_waiting:
                    raise RateLimited(
                        f"{len(self._queue)} requests are already waiting for a worker; retry later",
                        code="rate_limit_exceeded", retry_after=2,
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._unavailable(model)
                if not queued:
                    self._queue.append(me)
                    queued = True
                elif me.fut.done():
                    me.fut = loop.create_future()
                try:
                    await asyncio.wait_for(asyncio.shield(me.fut), remaining)
                except asyncio.TimeoutError:
                    raise self._unavailable(model) from None
        finally:
            if queued:
                self._queue.remove(me)
                self.wake()  # the next in line may go now

    def _unavailable(self, model: str) -> Unavailable:
        ready = self.registry.serving(model)
        if ready:
            why = f"all {len(ready)} worker(s) of {model!r} stayed busy for {self.admission_timeout_s:.0f} s"
        else:
            why = f"no worker of {model!r} is ready (loading, or missing heartbeats)"
        return Unavailable(why, retry_after=max(1.0, min(10.0, self.admission_timeout_s / 4)))
