"""Which worker gets a request: the fewest in flight for its slots, ties at random, with a bounded wait.

In-flight counts are the queen's own: a ``Lease`` adds one when a request is placed and takes it back
exactly once when the request ends, however it ends, so the counters cannot drift. A lease holds the
record of one worker *instance* (process): a restarted worker gets a new record starting from zero.

Waiters are served in arrival order (retries, admitted before, ahead of newcomers), but a waiter
holds back only slots it can use: one whose retry excludes a worker never keeps a newcomer off it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from rbee_fleet.common.errors import ModelNotFound, RateLimited, Unavailable
from rbee_fleet.queen.registry import Registry, WorkerRecord

# Chooses among the workers that could take a request now (prefix-aware routing); None: least busy.
Route = Callable[[list[WorkerRecord]], WorkerRecord]


class NoOtherWorker(Exception):
    """A retry found no worker left to try."""


def usable(rec: WorkerRecord, exclude: Collection[object], needs: frozenset[str], hive: str | None) -> bool:
    """Whether a request may go to ``rec``: not tried before, able to do all it needs, on its hive if pinned."""
    return not rec.excluded_by(exclude) and needs <= rec.capabilities and (hive is None or rec.hb.hive_id == hive)


@dataclass
class _Waiter:
    ticket: int
    model: str
    fut: asyncio.Future[None]
    exclude: Collection[object] = field(default_factory=frozenset)
    needs: frozenset[str] = frozenset()  # capabilities its request needs (contracts.capabilities)
    hive: str | None = None  # only this hive's workers (a pinned request)

    def can_use(self, rec: WorkerRecord) -> bool:
        return usable(rec, self.exclude, self.needs, self.hive)

    def ahead_of(self, other: _Waiter) -> bool:
        """Served before ``other``: retries before newcomers, then in arrival order."""
        return (bool(self.exclude) or self.hive is not None, -self.ticket) > (
            bool(other.exclude) or other.hive is not None, -other.ticket)


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
        self.closed: str | None = None  # why new requests are refused (the queen is draining)
        registry.on_capacity.append(self.wake)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def wake(self) -> None:
        """Let every waiter look again; they look in the order they came."""
        for waiter in self._queue:
            if not waiter.fut.done():
                waiter.fut.set_result(None)

    def close(self, why: str) -> None:
        """Refuse every request from now on, the waiting ones included (each gets a 503 saying ``why``)."""
        self.closed = why
        self.wake()

    def pick(self, model: str, exclude: Collection[object] = frozenset(),
             ahead: Collection[_Waiter] = (), needs: frozenset[str] = frozenset(),
             route: Route | None = None, hive: str | None = None) -> WorkerRecord | None:
        """The least loaded worker of ``model`` with a slot free for this request, or None.

        Each waiter in ``ahead`` keeps one free slot that it can use (restricted waiters choose first),
        so this request gets only a slot that none of them could take.
        """
        candidates = [rec for rec in self.registry.serving(model) if rec.free_slots() > 0]
        free = {rec.instance: rec.free_slots() for rec in candidates}
        claims = [[rec for rec in candidates if w.can_use(rec)] for w in ahead]
        for claim in sorted(claims, key=len):
            open_ = [rec for rec in claim if free[rec.instance] > 0]
            if open_:
                free[max(open_, key=lambda rec: free[rec.instance]).instance] -= 1
        eligible = [rec for rec in candidates if free[rec.instance] > 0 and usable(rec, exclude, needs, hive)]
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

    async def acquire(self, model: str, exclude: Collection[object] | None = None,
                      needs: frozenset[str] = frozenset(), route: Route | None = None,
                      hive: str | None = None) -> Lease:
        """A slot on a worker of ``model``: at once, or after the requests that came first (FIFO per model).

        ``exclude`` holds the worker instances (``WorkerRecord.instance``) a retry already tried; a worker
        id there excludes every instance of it. A retry was admitted before and goes ahead of newcomers.
        ``hive``: only that hive's workers (the request is pinned to it).
        """
        exclude = exclude or frozenset()
        if self.closed is not None:
            raise Unavailable(self.closed, code="shutting_down", retry_after=5)
        if not self.registry.knows(model):
            served = ", ".join(self.registry.models()) or "none yet"
            raise ModelNotFound(f"the model {model[:200]!r} does not exist in this fleet (serving: {served})",
                                param="model")
        deadline = time.monotonic() + self.admission_timeout_s
        loop = asyncio.get_running_loop()
        me = _Waiter(next(self._tickets), model, loop.create_future(), exclude, needs, hive)
        queued = False
        try:
            while True:
                if self.closed is not None:
                    raise Unavailable(self.closed, code="shutting_down", retry_after=5)
                ahead = [w for w in self._queue if w is not me and w.model == model and w.ahead_of(me)]
                rec = self.pick(model, exclude, ahead, needs, route, hive)
                if rec is not None:
                    return Lease(rec, self)
                if (exclude or hive is not None) and not self.registry.others(model, exclude, hive):
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
