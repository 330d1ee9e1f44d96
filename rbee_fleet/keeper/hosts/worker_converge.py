"""Bringing a host's workers to the inventory through the queen, without dropping a model's service.

The plan comes from ``deploy.converge`` on the hive's own list of its workers. New workers are spawned
as jobs; a changed one is replaced: its replacement starts beside it, and once the queen has it ready
(its heartbeat says so) the old one is stopped, which drains it (a worker finishes its answers in flight
on SIGTERM). Where the two do not fit in the host's free memory together, the old one is stopped (and
drained) first. Workers the inventory no longer declares are stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection

import aiohttp

from rbee_fleet.common.errors import ApiError, OperationFailed
from rbee_fleet.contracts.fleet import FleetStatus, SupervisedWorker, WorkerStopOp
from rbee_fleet.deploy.converge import WorkerChange, plan_workers
from rbee_fleet.deploy.errors import DeployError
from rbee_fleet.deploy.plan import HostSpec
from rbee_fleet.keeper.queen_client import QueenClient, QueenUnreachable
from rbee_fleet.keeper.queen_service import EventSink, run_job

READY_TIMEOUT_S = 120.0  # a spawned worker's heartbeat must say ready within this, through the queen
Say = Callable[[str, str], None]  # (alias, what is happening)


class WorkerConverger:
    """Plans and carries out each host's worker changes; one per deploy run."""

    def __init__(self, client: QueenClient, token: str, sink: EventSink | None = None,
                 say: Say = lambda alias, message: None, embedded: Collection[str] = ()) -> None:
        self.client = client
        self.token = token
        self.sink = sink
        self.say = say
        self.embedded = frozenset(embedded)  # hives that run inside the queen: their list comes from it

    # -- reading -----------------------------------------------------------------------------------

    async def running(self, spec: HostSpec) -> list[SupervisedWorker]:
        """The hive's workers as the hive itself lists them (none when it does not answer): right after a
        restart, the queen's copy from the previous heartbeat may still list the old process's workers. The
        embedded hive's list is the queen's own."""
        if spec.alias in self.embedded:
            status = await self.client.status()
            return next((h.workers for h in status.hives if h.hive_id == spec.alias), [])
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                async with session.get(f"{spec.url}/v1/workers", headers=headers) as resp:
                    if resp.status != 200:
                        return []
                    body = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return []
        return [SupervisedWorker.model_validate(w) for w in body.get("workers", [])]

    async def plan(self, spec: HostSpec) -> list[WorkerChange]:
        return plan_workers(list(spec.workers), await self.running(spec))

    # -- changing ----------------------------------------------------------------------------------

    async def apply(self, spec: HostSpec) -> list[WorkerChange]:
        """Carry out the host's plan; returns the changes made. Raises ``DeployError`` naming the worker."""
        changes = [c for c in await self.plan(spec) if c.changes]
        if not changes:
            return []
        starts = [c for c in changes if c.action == "start"]
        replaces = [c for c in changes if c.action == "replace"]
        stops = [c for c in changes if c.action == "stop"]
        await asyncio.gather(*(self._start(spec, c) for c in starts))
        for change in replaces:  # one at a time: at most one extra worker's memory at once
            await self._replace(spec, change)
        await asyncio.gather(*(self._stop(spec, c.running or c.declared) for c in stops))
        return changes

    async def _start(self, spec: HostSpec, change: WorkerChange) -> None:
        assert change.op is not None and change.new_id is not None
        self.say(spec.alias, f"starting worker {change.new_id} ({change.model})")
        await self._job(spec, change.op, change.new_id)
        await self._ready(spec, change.new_id)

    async def _replace(self, spec: HostSpec, change: WorkerChange) -> None:
        assert change.op is not None and change.new_id is not None and change.running is not None
        room = await self._room_for(spec, change.model)
        if room is None:
            self.say(spec.alias, f"replacing worker {change.running} by {change.new_id}: {', '.join(change.changed)}")
            await self._start(spec, change)
            await self._stop(spec, change.running)
            return
        self.say(spec.alias, f"replacing worker {change.running}: {room}; stopping it first (it drains its requests)")
        await self._stop(spec, change.running)
        await self._start(spec, change)

    async def _room_for(self, spec: HostSpec, model: str) -> str | None:
        """None when a second worker of ``model`` fits beside the running one, else why it does not."""
        try:
            status = await self.client.status()
        except QueenUnreachable:
            return None
        gpu = any(op.device.startswith("cuda") or op.backend == "exllamav2" for op in spec.workers if op.model == model)
        return no_room_for_second(status, spec.alias, model, gpu, spec.memory_budget_mb)

    async def _stop(self, spec: HostSpec, worker_id: str) -> None:
        self.say(spec.alias, f"stopping worker {worker_id} (it drains its requests first)")
        try:
            await self._job(spec, WorkerStopOp(hive=spec.alias, worker_id=worker_id), worker_id)
        except DeployError as exc:
            if "no worker" not in exc.reason:  # already gone: what we wanted
                raise

    async def _job(self, spec: HostSpec, op: object, label: str) -> None:
        try:
            await run_job(self.client, op, label, self.sink)
        except (OperationFailed, ApiError) as exc:
            message = str(exc).splitlines()[0]
            prefix = "" if message.startswith(f"worker {label}") else f"worker {label}: "
            raise DeployError(spec.alias, prefix + message) from None
        except QueenUnreachable as exc:
            raise DeployError(spec.alias, str(exc)) from None

    async def _ready(self, spec: HostSpec, worker_id: str, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until the queen has ``worker_id`` live and ready (its own heartbeat says so)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if (await self.client.status()).worker_ready(worker_id):
                    return
            except QueenUnreachable as exc:
                raise DeployError(spec.alias, str(exc)) from None
            if time.monotonic() > deadline:
                raise DeployError(spec.alias, f"worker {worker_id}: the queen saw no ready heartbeat from it "
                                              f"within {timeout:.0f} s")
            await asyncio.sleep(0.2)


def no_room_for_second(status: FleetStatus, hive_id: str, model: str, gpu: bool,
                       budget_mb: int | None = None) -> str | None:
    """Why a second worker of ``model`` does not fit on ``hive_id`` beside the first (None: it fits, or the queen
    cannot tell). The need is the queen's estimate for the model; the room is the hive's free RAM, or its GPUs'
    free VRAM summed, where the running worker's own memory is already taken, and at most what the hive's
    ``memory_budget_mb`` leaves once its live workers' estimated needs are counted (as the queen does when it
    loads a model on demand)."""
    needs = {m.id: m.need_mb for m in status.catalog}
    need = needs.get(model, 0)
    hive = next((h for h in status.hives if h.hive_id == hive_id), None)
    if hive is None or not need:
        return None
    kind = "VRAM" if gpu else "RAM"
    free = sum(g.vram_free_mb for g in hive.devices.gpus) if gpu else hive.devices.cpu.ram_available_mb
    if need > free:
        return f"a second {model} worker needs about {need} MB and the host has {free} MB of {kind} free"
    if budget_mb is not None:
        used = sum(needs.get(w.heartbeat.model, 0) for w in status.workers
                   if w.live and w.heartbeat.hive_id == hive_id and w.heartbeat.state.value not in ("stopped", "failed"))
        left = max(0, budget_mb - used)
        if need > left:
            return (f"a second {model} worker needs about {need} MB and the host's memory budget has {left} MB left "
                    f"({budget_mb} MB, {used} MB taken by its workers)")
    return None
