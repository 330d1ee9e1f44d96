"""Slots and a bounded wait queue in front of the backend, plus the worker's token meter."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from rbee_fleet.common.errors import RateLimited


class Admission:
    """At most ``slots`` generations run; up to ``max_queue`` more wait; beyond that, 429."""

    def __init__(self, slots: int, max_queue: int) -> None:
        self.slots = slots
        self.max_queue = max_queue
        self.busy = 0
        self.waiting = 0
        self._free = asyncio.Semaphore(slots)
        self._idle = asyncio.Event()
        self._idle.set()
        self._durations: deque[float] = deque(maxlen=20)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.busy >= self.slots and self.waiting >= self.max_queue:
            raise RateLimited(
                f"the worker is busy ({self.busy} running, {self.waiting} waiting); retry later",
                retry_after=self.expected_wait(),
            )
        self.waiting += 1
        self._idle.clear()
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.busy += 1
        started = time.monotonic()
        try:
            yield
        finally:
            self._durations.append(time.monotonic() - started)
            self.busy -= 1
            self._free.release()
            if self.busy == 0 and self.waiting == 0:
                self._idle.set()

    def expected_wait(self) -> float:
        """Seconds until a queued request would likely start: what a Retry-After should say."""
        avg = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1.0, avg * (self.waiting + 1) / self.slots)

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


class TokenMeter:
    """Tokens per second over the last ``window`` seconds, in one-second buckets."""

    def __init__(self, window: int = 10) -> None:
        self._window = window
        self._buckets: deque[list[int]] = deque()  # [second, tokens]
        self.total = 0

    def add(self, tokens: int) -> None:
        self.total += tokens
        now = int(time.monotonic())
        if self._buckets and self._buckets[-1][0] == now:
            self._buckets[-1][1] += tokens
        else:
            self._buckets.append([now, tokens])

    def rate(self) -> float:
        horizon = int(time.monotonic()) - self._window
        while self._buckets and self._buckets[0][0] < horizon:
            self._buckets.popleft()
        return sum(n for _, n in self._buckets) / self._window
