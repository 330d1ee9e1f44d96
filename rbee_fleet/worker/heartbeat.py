"""Heartbeats straight to the queen: on a timer, and at once on every state change; pulses between them.

Each heartbeat carries the worker's whole state, so a queen that restarted learns about the worker
again from the next one: re-registration needs nothing more. Reading that state may wait on the engine
(a llama-server busy with a long prompt answers its status late), so liveness travels separately: a pulse,
every second or so as the queen's ack asks, names the process and nothing else and never waits on the
engine. A frozen host stops both; a slow but live worker keeps pulsing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import aiohttp

from rbee_fleet.contracts.fleet import HeartbeatAck, PulseAck, WorkerHeartbeat, WorkerPulse, WorkerState
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
        self.pulse_interval: float | None = None  # set by the queen's ack; None: no pulses
        self._pulse_url = f"{settings.queen_url.rstrip('/')}/v1/worker-pulse" if settings.queen_url else None
        self._identity: WorkerPulse | None = None
        self._failing = False

    async def send(self) -> bool:
        if self._url is None:
            return False
        await self._runtime.refresh()
        hb = self._runtime.heartbeat()
        payload = hb.model_dump(mode="json")
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
        self.pulse_interval = ack.pulse_interval_s
        self._identity = WorkerPulse(worker_id=hb.worker_id, pid=hb.pid, started_at=hb.started_at)
        return True

    async def pulse(self) -> bool | None:
        """One pulse; True when the queen knows this process, False when it does not, None on failure."""
        if self._pulse_url is None or self._identity is None or not self.pulse_interval:
            return None
        timeout = aiohttp.ClientTimeout(total=max(1.0, 2 * self.pulse_interval))
        try:
            async with self._session.post(self._pulse_url, json=self._identity.model_dump(), headers=self._headers,
                                          timeout=timeout) as resp:
                if resp.status == 404:  # a queen from before pulses: heartbeats alone
                    self.pulse_interval = None
                    return None
                if resp.status != 200:
                    return None
                return PulseAck.model_validate(await resp.json()).known
        except Exception:  # noqa: BLE001 - the heartbeat loop reports an unreachable queen
            return None

    async def _pulse_loop(self) -> None:
        while True:
            await asyncio.sleep(self.pulse_interval or 1.0)
            if await self.pulse() is False:
                self._runtime.changed.set()  # the queen forgot us (it restarted): a full heartbeat now

    async def run(self) -> None:
        pulses = asyncio.create_task(self._pulse_loop(), name="pulse")
        try:
            await self._heartbeat_loop()
        finally:
            pulses.cancel()

    async def _heartbeat_loop(self) -> None:
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
