"""Graceful shutdown of the queen: stop taking requests, let answers in flight finish, then cut cleanly.

On SIGTERM (what ``rbee-keeper down`` sends) the queen keeps listening but answers every new completion
and every new job with a 503 and ``Retry-After``; requests waiting for a worker slot get the same 503 at
once. Streams in flight run to their end for up to ``drain_timeout_s``; any still running then end with
an OpenAI error event (code ``shutting_down``), never a cut connection. Only then do the hives stop
their workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from rbee_fleet.common.errors import Unavailable
from rbee_fleet.queen.api.keys import QUEEN, SETTINGS

log = logging.getLogger(__name__)

DRAINED = frozenset({("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/jobs")})
CUT_GRACE_S = 5.0  # after cutting the remaining streams, how long their error events may take to go out


class Drain:
    """Counts completions in flight; once draining, refuses new completions and jobs."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if (request.method, request.path) not in DRAINED:
            return await handler(request)
        if self.draining:
            raise Unavailable("the queen is shutting down and takes no new requests; retry later",
                              code="shutting_down", retry_after=5)
        self.in_flight += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def run(self, app: web.Application) -> None:
        """The whole drain: refuse, wait up to the drain timeout, cut what is left with an error event."""
        queen = app[QUEEN]
        timeout = app[SETTINGS].config.drain_timeout_s
        started = time.monotonic()
        self.draining = True
        waiting = queen.scheduler.waiting
        queen.scheduler.close("the queen is shutting down; retry later")
        log.info("draining: %d request(s) in flight (%d of them waiting for a slot, refused now); "
                 "waiting up to %g s", self.in_flight, waiting, timeout)
        if await self.wait_idle(timeout):
            log.info("drained in %.1f s", time.monotonic() - started)
            return
        left = self.in_flight
        queen.proxy.cut_all(f"the queen is shutting down and its drain timeout ({timeout:g} s) has passed")
        await self.wait_idle(CUT_GRACE_S)
        log.warning("drain timeout (%g s): ended %d answer(s) still running with an error event", timeout, left)


DRAIN = web.AppKey("drain", Drain)
