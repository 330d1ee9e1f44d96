"""Heartbeats straight to the queen: on a timer, and at once on every state change.

Each heartbeat carries the worker's whole state, so a queen that restarted learns about the worker
again from the next one: re-registration needs nothing more.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import aiohttp

from rbee_fleet.contracts.fleet import HeartbeatAck, WorkerHeartbeat, WorkerState
from rbee_fleet.worker.runtime import WorkerSettings

log = logging.getLogger(__name__)

TIMEOUT = aiohttp.ClientTimeout(total=5)


class HeartbeatSource(Protocol):
    """What a heartbeat is read from: the worker's runtime, whatever its engine."""

    settings: WorkerSettings
    state: WorkerState
    changed: asyncio.Event

    async def refresh(self) -> None: ...

    def heartbeat(self) -> WorkerHeartbeat: ...


class HeartbeatSender:
    def __init__(self, runtime: HeartbeatSource, session: aiohttp.ClientSession) -> None:
        self._runtime = runtime
        self._session = session
        settings = runtime.settings
        self._url = f"{settings.queen_url.rstrip('/')}/v1/worker-heartbeat" if settings.queen_url else None
        self._headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        self.interval = settings.heartbeat_interval_s
        self._failing = False

    async def send(self) -> bool:
        if self._url is None:
            return False
        await self._runtime.refresh()
        payload = self._runtime.heartbeat().model_dump(mode="json")
        try:
            async with self._session.post(self._url, json=payload, headers=self._headers, timeout=TIMEOUT) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                ack = HeartbeatAck.model_validate(await resp.json())
        except Exception as exc:  # noqa: BLE001 - the queen may be down; keep trying
            if not self._failing:
                log.warning("heartbeat to %s failed: %s (will keep trying)", self._url, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("heartbeats reach the queen again")
        self._failing = False
        self.interval = ack.heartbeat_interval_s or self.interval
        return True

    async def run(self) -> None:
        runtime = self._runtime
        while True:
            runtime.changed.clear()
            await self.send()
            try:
                await asyncio.wait_for(runtime.changed.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    async def say_goodbye(self) -> None:
        self._runtime.state = WorkerState.STOPPED
        await self.send()
