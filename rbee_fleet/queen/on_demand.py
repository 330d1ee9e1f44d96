"""Models on demand: load a model of a hive's catalog when a request asks for it, unload it when idle.

A request for a model that no worker runs, but that a live hive's catalog holds, makes the queen place a
worker (hives with the files first, then the most free memory for the model's estimated need), evicting
the least recently used idle on-demand workers of a hive when that is what makes room, and spawn it as a
job. The request waits for the load (``load_timeout_s``); a streamed one gets SSE comment lines meanwhile.
Requests for a model already loading join that load. An on-demand worker idle for its TTL is unloaded,
as a job too. Workers the queen did not start on demand (declared in the inventory, or spawned by an
operator) are pinned: never unloaded, never evicted. A load that fails is remembered for
``load_retry_after_s``: requests in that time get its error at once, so a broken model is not reloaded
in a loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from rbee_fleet.common import sse
from rbee_fleet.common.errors import ApiError, Unavailable
from rbee_fleet.common.jobs import Emitter, JobRegistry
from rbee_fleet.contracts.fleet import (
    HiveView,
    JobState,
    ModelDownloadOp,
    ModelEntry,
    ModelView,
    WorkerSpawnOp,
    WorkerState,
    WorkerStopOp,
)
from rbee_fleet.contracts.stream import error_event
from rbee_fleet.queen import catalog_view
from rbee_fleet.queen.catalog_view import HiveRoom, estimated_need_mb, is_cpu
from rbee_fleet.queen.hives import HiveHandle
from rbee_fleet.queen.metrics import QueenMetrics
from rbee_fleet.queen.prefix_routing import PrefixRouter
from rbee_fleet.queen.registry import Registry
from rbee_fleet.queen.settings import QueenSettings

log = logging.getLogger(__name__)

READY_GRACE_S = 10.0  # after the hive reports the worker ready, its first heartbeat may take this long
DOWNLOADABLE = ("hf:", "http://", "https://")


class ModelLoadFailed(ApiError):
    status = 503
    type = "server_error"
    code = "model_load_failed"


class StreamEnded(Exception):
    """A load failed after a streamed request's SSE response had begun: it ended with the error event."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("the stream ended with the load's error")
        self.response = response


class NoRoom(ApiError):
    status = 503
    type = "server_error"
    code = "insufficient_memory"


@dataclass
class Owned:
    """A worker the queen started on demand (and may therefore unload)."""

    worker_id: str
    hive_id: str
    model: str
    need_mb: int
    loaded_at: float = 0.0  # monotonic; 0 while loading


@dataclass(frozen=True)
class Plan:
    room: HiveRoom
    need_mb: int
    evict: tuple[Owned, ...]
    source: str | None  # where to download the model from, for a hive without its files


class Hives(Protocol):
    """How on-demand loading reaches the fleet's hives (the queen provides it)."""

    def hive(self, hive_id: str) -> HiveHandle: ...

    def refresh_embedded(self) -> None: ...


class OnDemand:
    def __init__(self, settings: QueenSettings, registry: Registry, jobs: JobRegistry, hives: Hives,
                 metrics: QueenMetrics, router: PrefixRouter) -> None:
        self.settings = settings
        self.registry = registry
        self.jobs = jobs
        self.hives = hives
        self.metrics = metrics
        self.router = router
        self.owned: dict[str, Owned] = {}
        self._loads: dict[str, asyncio.Task[None]] = {}  # model -> its load
        self._load_jobs: dict[str, str] = {}  # model -> the job id of its load
        self._unloading: dict[str, asyncio.Task[None]] = {}  # worker id -> its unload
        self._failed: dict[str, tuple[float, str]] = {}  # model -> (when, why)
        self._placing = asyncio.Lock()
        self._ids = 0

    # -- the request path ------------------------------------------------------------------------

    def wanted(self, model: str) -> bool:
        """Whether a request for ``model`` must first wait for a load (no I/O while a worker of it runs)."""
        if not self.settings.config.on_demand or not self.settings.policy(model).on_demand:
            return False
        if model in self._loads:
            return True
        if self._has_worker(model):
            return False
        # No worker heartbeats for it: is a hive starting or restarting one? (rare path: reads the hives)
        self.hives.refresh_embedded()
        return not self._supervised(model)

    async def hold(self, request: web.Request, model: str, stream: bool) -> web.StreamResponse | None:
        """Wait until a worker of ``model`` runs, loading one if needed (returns at once when one does).

        A streamed request gets its SSE response started after ``load_keepalive_s`` of waiting, with a
        comment line every ``load_keepalive_s``; that response is returned (the answer is streamed into
        it). None when nothing was sent to the client.
        """
        if not self.wanted(model):
            return None
        out: web.StreamResponse | None = None

        async def keepalive(note: str) -> None:
            nonlocal out
            if out is None:
                out = web.StreamResponse(headers=sse.SSE_HEADERS)
                await out.prepare(request)
            await out.write(f": {note}\n\n".encode())

        try:
            await self.ensure(model, keepalive if stream else None)
        except ApiError as exc:
            self.metrics.errors.labels(model, exc.code or exc.type).inc()
            if out is None:
                raise
            await out.write(error_event(exc.message, type=exc.type, code=exc.code))
            await out.write_eof()
            raise StreamEnded(out) from None
        return out

    async def ensure(self, model: str, keepalive: Callable[[str], Awaitable[None]] | None = None) -> None:
        task = self._loads.get(model)
        if task is None:
            if self._has_worker(model) or self._supervised(model):
                return
            failed = self._failed.get(model)
            if failed is not None:
                at, why = failed
                left = self.settings.config.load_retry_after_s - (time.monotonic() - at)
                if left > 0:
                    raise ModelLoadFailed(f"{why} (not tried again for another {left:.0f} s)", retry_after=left)
                del self._failed[model]
            self.hives.refresh_embedded()
            entry = catalog_view.find_entry(model, self._live_hives())
            if entry is None:
                return  # in no catalog: the proxy answers 404
            task = asyncio.create_task(self._load(model, entry), name=f"load-{model}")
            self._loads[model] = task
            task.add_done_callback(lambda t, m=model: self._load_done(m, t))
        started = time.monotonic()
        deadline = started + self.settings.config.load_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                job = self._load_jobs.get(model)
                raise Unavailable(f"{model!r} is still loading after {self.settings.config.load_timeout_s:.0f} s"
                                  f"{f' (job {job})' if job else ''}; retry later", retry_after=5)
            try:
                await asyncio.wait_for(asyncio.shield(task), min(self.settings.config.load_keepalive_s, remaining))
                return
            except asyncio.TimeoutError:
                if task.done():  # it ended just as the wait did: loaded, or failed with its own error
                    error = None if task.cancelled() else task.exception()
                    if error is None and not task.cancelled():
                        return
                    raise ModelLoadFailed(f"loading {model!r} failed: {error or 'cancelled'}") from None
                if keepalive is not None and time.monotonic() < deadline:
                    await keepalive(f"rbee: loading {model} ({time.monotonic() - started:.0f} s)")

    def _load_done(self, model: str, task: asyncio.Task[None]) -> None:
        if self._loads.get(model) is task:
            del self._loads[model]
        if not task.cancelled():
            task.exception()  # retrieved: its waiters (if any are left) got it

    def _has_worker(self, model: str) -> bool:
        """A live worker of ``model`` that is ready or loading, and not being unloaded."""
        now = time.monotonic()
        reg = self.registry
        return any(rec.hb.model == model and rec.id not in reg.withheld and reg.is_live(rec, now)
                   and rec.hb.state in (WorkerState.READY, WorkerState.LOADING) for rec in reg.workers.values())

    def _supervised(self, model: str) -> bool:
        """Whether a live hive runs, starts or restarts a worker of ``model`` (one not being unloaded)."""
        return any(w.model == model and w.state.active
                   and w.worker_id not in self.registry.withheld and w.worker_id not in self._unloading
                   for h in self._live_hives() for w in h.workers)

    def _live_hives(self) -> list[HiveView]:
        return [h for h in self.registry.hive_views() if h.live]

    # -- loading ---------------------------------------------------------------------------------

    async def _load(self, model: str, entry: ModelEntry) -> None:
        policy = self.settings.policy(model)
        async with self._placing:  # one placement at a time: two loads never count the same free memory
            self.hives.refresh_embedded()
            plan = self.plan(model, entry)
            worker_id = self._new_worker_id(plan.room.hive_id, model)
            owned = Owned(worker_id, plan.room.hive_id, model, plan.need_mb)
            self.owned[worker_id] = owned
            for victim in plan.evict:
                self.registry.withhold(victim.worker_id)  # no new requests while it goes
        op = WorkerSpawnOp(hive=plan.room.hive_id, model=model, worker_id=worker_id,
                           device="auto", ctx_size=policy.ctx_size,
                           threads=policy.threads, slots=policy.slots)
        job = self.jobs.submit(op, lambda emit: self._run_load(op, plan, emit))
        self._load_jobs[model] = job.id
        try:
            await job.wait()
            if job.state is not JobState.SUCCEEDED:
                why = f"loading {model!r} on hive {plan.room.hive_id} failed (job {job.id}): {job.error}"
                self._failed[model] = (time.monotonic(), why)
                self.metrics.model_loads.labels(model, "failed").inc()
                log.warning("%s", why)
                raise ModelLoadFailed(why, retry_after=self.settings.config.load_retry_after_s)
            await self._registered(worker_id)
            owned.loaded_at = time.monotonic()
            self.metrics.model_loads.labels(model, "loaded").inc()
        except BaseException:
            if owned.loaded_at == 0.0:
                self.owned.pop(worker_id, None)
            raise
        finally:
            self._load_jobs.pop(model, None)

    async def _run_load(self, op: WorkerSpawnOp, plan: Plan, emit: Emitter) -> dict[str, Any]:
        room = plan.room
        budget = f", budget {room.budget_mb} MB" if room.budget_mb else ""
        emit.log(f"on-demand load of {op.model} for a waiting request: hive {room.hive_id}, about {plan.need_mb} MB "
                 f"needed, {room.free_mb} MB free there{budget}")
        for victim in plan.evict:
            emit.progress(f"unloading {victim.worker_id} ({victim.model}, least recently used) to make room")
            job_id = await self.unload(victim, "evicted")
            emit.log(f"unloaded {victim.worker_id} (job {job_id})")
        hive = self.hives.hive(room.hive_id)
        if not room.has_files:
            assert plan.source is not None
            emit.progress(f"{room.hive_id} has no copy of {op.model}: downloading it from {plan.source}")
            await hive.run(ModelDownloadOp(hive=room.hive_id, source=plan.source, name=op.model), emit)
        result = await hive.run(op, emit)
        return {**result, "hive": room.hive_id, "on_demand": True}

    async def _registered(self, worker_id: str) -> None:
        """Wait (briefly) for the new worker's heartbeat to put it in rotation."""
        deadline = time.monotonic() + READY_GRACE_S
        while time.monotonic() < deadline:
            rec = self.registry.workers.get(worker_id)
            if rec is not None and self.registry.in_rotation(rec):
                return
            await asyncio.sleep(0.05)

    def plan(self, model: str, entry: ModelEntry) -> Plan:
        """Where a worker of ``model`` goes, and which idle on-demand workers must go first to make room."""
        hives = self._live_hives()
        overrides = {m: p.memory_mb for m, p in self.settings.model_policies.items()}
        need = estimated_need_mb(entry, overrides.get(model))
        entries: dict[str, ModelEntry] = {}
        for h in hives:
            for e in h.models:
                entries.setdefault(e.id, e)
        sources = [e.source for h in hives for e in h.models if e.id == model and e.source.startswith(DOWNLOADABLE)]
        source = sources[0] if sources else None
        rooms: list[HiveRoom] = []
        for h in hives:
            if not any(e.id == model for e in h.models) and source is None:
                continue
            used = catalog_view.worker_needs(self.registry, h.hive_id, entries, overrides)
            loading = sum(o.need_mb for o in self.owned.values()
                          if o.hive_id == h.hive_id and not o.loaded_at and o.worker_id not in used)
            rooms.append(catalog_view.room(h, entry, sum(used.values()) + loading,
                                           self.settings.hive_budgets_mb.get(h.hive_id)))
        rooms.sort(key=lambda r: (not r.has_files, -r.free_mb, r.hive_id))
        for r in rooms:
            if r.free_mb >= need:
                return Plan(r, need, (), source)
        for r in rooms:
            freed = 0
            chosen: list[Owned] = []
            for victim in self._idle_lru(r.hive_id):
                chosen.append(victim)
                freed += victim.need_mb
                device_free = r.device_free_mb + freed
                budget_free = r.budget_mb - r.used_mb + freed if r.budget_mb is not None else device_free
                if min(device_free, budget_free) >= need:
                    return Plan(r, need, tuple(chosen), source)
        kind = "RAM" if is_cpu(entry) else "VRAM"
        if not rooms:
            raise NoRoom(f"cannot load {model!r}: no live hive can take it (it needs about {need} MB of {kind})")
        best = max(rooms, key=lambda r: r.free_mb)
        budget = f" within its memory budget of {best.budget_mb} MB" if best.budget_mb else ""
        raise NoRoom(f"cannot load {model!r}: it needs about {need} MB of {kind}, and the largest free memory "
                     f"of any hive is {best.free_mb} MB (hive {best.hive_id}{budget})", retry_after=10)

    def _idle_lru(self, hive_id: str) -> list[Owned]:
        """This hive's on-demand workers that serve nothing now, least recently used first."""
        idle = []
        for o in self.owned.values():
            rec = self.registry.workers.get(o.worker_id)
            if (o.hive_id == hive_id and o.loaded_at and o.worker_id not in self._unloading
                    and o.worker_id not in self.registry.withheld and rec is not None and rec.in_flight == 0):
                idle.append((max(rec.last_used, o.loaded_at), o))
        return [o for _, o in sorted(idle, key=lambda pair: pair[0])]

    def _new_worker_id(self, hive_id: str, model: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{hive_id}-{model}-auto")
        taken = {*self.registry.workers, *self.owned}
        for h in self.registry.hive_views():
            taken |= {w.worker_id for w in h.workers if not w.state.gone}
        while True:
            self._ids += 1
            if f"{base}-{self._ids}" not in taken:
                return f"{base}-{self._ids}"

    # -- unloading -------------------------------------------------------------------------------

    def reap(self) -> None:
        """Unload on-demand workers idle for their model's TTL (called every second)."""
        now = time.monotonic()
        for o in list(self.owned.values()):
            ttl = self.settings.idle_ttl(o.model)
            if ttl <= 0 or not o.loaded_at or o.worker_id in self._unloading:
                continue
            rec = self.registry.workers.get(o.worker_id)
            if rec is None or rec.in_flight > 0 or not self.registry.in_rotation(rec, now):
                continue
            idle = now - max(rec.last_used, o.loaded_at)
            if idle >= ttl:
                self.registry.withhold(o.worker_id)
                asyncio.create_task(self.unload(o, "idle", f"idle for {idle:.0f} s (TTL {ttl:g} s)"),
                                    name=f"unload-{o.worker_id}")

    async def unload(self, o: Owned, reason: str, detail: str = "") -> str:
        """Stop an on-demand worker as a job of its own; returns the job id."""
        self.registry.withhold(o.worker_id)
        self.router.forget(o.worker_id)
        op = WorkerStopOp(hive=o.hive_id, worker_id=o.worker_id)
        hive = self.hives.hive(o.hive_id)

        async def run(emit: Emitter) -> dict[str, Any]:
            emit.log(f"unloading on-demand worker {o.worker_id} of {o.model}: {reason}{f', {detail}' if detail else ''}")
            return await hive.run(op, emit)

        job = self.jobs.submit(op, run)
        self._unloading[o.worker_id] = asyncio.current_task()  # type: ignore[assignment]
        try:
            await job.wait()
        finally:
            self._unloading.pop(o.worker_id, None)
            self.owned.pop(o.worker_id, None)
            self.registry.forget_worker(o.worker_id)
        if job.state is JobState.SUCCEEDED:
            self.metrics.model_unloads.labels(o.model, reason).inc()
            log.info("unloaded %s (%s)", o.worker_id, reason)
        else:
            log.warning("unloading %s failed (job %s): %s", o.worker_id, job.id, job.error)
        return job.id

    # -- views -----------------------------------------------------------------------------------

    def views(self) -> list[ModelView]:
        self.hives.refresh_embedded()
        overrides = {m: p.memory_mb for m, p in self.settings.model_policies.items()}
        return catalog_view.model_views(self.registry, self.registry.hive_views(), self._loads, overrides)

    async def close(self) -> None:
        tasks = [*self._loads.values(), *self._unloading.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
