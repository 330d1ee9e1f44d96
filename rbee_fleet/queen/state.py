"""The queen's services, built once at start-up and shared by the handlers."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp

from rbee_fleet import __version__
from rbee_fleet.common.errors import NotFound
from rbee_fleet.common.jobs import Emitter, Job, JobRegistry
from rbee_fleet.contracts.fleet import FleetStatus, JobRequest, QueenView, WorkerSpawnOp
from rbee_fleet.hive.service import HiveService
from rbee_fleet.queen import hive_choice
from rbee_fleet.queen.hives import EmbeddedHive, HiveHandle, RemoteHive
from rbee_fleet.queen.metrics import QueenMetrics
from rbee_fleet.queen.on_demand import OnDemand
from rbee_fleet.queen.prefix_routing import PrefixRouter
from rbee_fleet.queen.proxy import WorkerProxy
from rbee_fleet.queen.registry import Registry
from rbee_fleet.queen.scheduler import Scheduler
from rbee_fleet.queen.serving import Policy, Serving
from rbee_fleet.queen.settings import QueenSettings

log = logging.getLogger(__name__)


class Queen:
    def __init__(self, settings: QueenSettings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.session = session
        self.started_at = time.time()
        self.registry = Registry(settings.config.heartbeat_timeout_s, pulse_timeout_s=settings.config.pulse_timeout_s)
        self.scheduler = Scheduler(self.registry, settings.config.admission_timeout_s, settings.config.max_waiting)
        self.metrics = QueenMetrics(self.registry)
        self.metrics.waiting.set_function(lambda: self.scheduler.waiting)
        self.proxy = WorkerProxy(self.scheduler, session, self.metrics, settings.cluster_token, settings.read_timeout_s)
        self.jobs = JobRegistry()
        self.router = PrefixRouter(block_chars=settings.config.prefix_block_chars, load_guard=settings.config.prefix_load_guard,
                                   on_decision=self.metrics.count_decision)
        self.embedded: EmbeddedHive | None = None
        if settings.embedded_hive is not None:
            self.embedded = EmbeddedHive(HiveService(settings.embedded_hive, session))
        self.on_demand = OnDemand(settings, self.registry, self.jobs, self, self.metrics, self.router)
        self.serving = Serving(Policy(settings.cluster_token, settings.config.prefix_routing), self.registry, self.router,
                               self.on_demand, self.proxy)

    # -- hives -----------------------------------------------------------------------------------

    def hive(self, hive_id: str) -> HiveHandle:
        if self.embedded is not None and hive_id == self.embedded.hive_id:
            return self.embedded
        record = self.registry.hives.get(hive_id)
        url = record.url if record is not None else self.settings.remote_hives.get(hive_id)
        if url is None:
            known = self.hive_ids()
            raise NotFound(f"no hive {hive_id!r} in this fleet (known: {', '.join(known) or 'none'})", param="hive")
        return RemoteHive(hive_id, url, self.session, self.settings.cluster_token)

    def refresh_embedded(self) -> None:
        if self.embedded is not None:
            self.registry.hive_heartbeat(self.embedded.status())

    # -- jobs ------------------------------------------------------------------------------------

    def dispatch(self, request: JobRequest) -> Job:
        op = request.operation
        # A spawn is idempotent by worker id: the same spawn asked for while one runs (the keeper's `up`
        # right after the queen started the inventory's workers itself) follows that job.
        join = isinstance(op, WorkerSpawnOp) and op.worker_id is not None
        if isinstance(op, WorkerSpawnOp) and op.hive == hive_choice.AUTO and hive_choice.AUTO not in self.hive_ids():
            return self.jobs.submit(op, lambda emit: self.spawn_anywhere(op, emit), join=join)
        hive = self.hive(op.hive)
        return self.jobs.submit(op, lambda emit: hive.run(op, emit), join=join)

    def hive_ids(self) -> list[str]:
        return sorted({*self.settings.remote_hives, *self.registry.hives,
                       *([self.embedded.hive_id] if self.embedded else [])})

    async def spawn_anywhere(self, op: WorkerSpawnOp, emit: Emitter) -> dict[str, Any]:
        """``hive = "auto"``: the live hives, their devices from their heartbeats, then placement."""
        self.refresh_embedded()
        views = {v.hive_id: v for v in self.registry.hive_views() if v.live}
        handles = {hive_id: self.hive(hive_id) for hive_id in views}
        return await hive_choice.spawn_anywhere(op, handles, {h: v.devices for h, v in views.items()}, emit)

    def ensure_declared_workers(self) -> list[Job]:
        """Start the inventory's workers on the embedded hive (already running ones are left alone)."""
        return [self.dispatch(JobRequest(operation=op)) for op in self.settings.declared_workers]

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> FleetStatus:
        self.refresh_embedded()
        now = time.time()
        in_flight = sum(r.in_flight for r in self.registry.workers.values())
        requests = sum(s.value for m in self.metrics.requests.collect() for s in m.samples if s.name.endswith("_total"))
        return FleetStatus(
            queen=QueenView(version=__version__, url=self.settings.url, started_at=self.started_at,
                            uptime_s=round(now - self.started_at, 1), requests_total=int(requests), in_flight=in_flight,
                            waiting=self.scheduler.waiting),
            hives=self.registry.hive_views(),
            workers=self.registry.worker_views(),
            models=self.registry.models(),
            catalog=self.on_demand.views(),
        )

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.registry.sweep()
            self.scheduler.wake()
            self.on_demand.reap()

    async def start(self) -> None:
        if self.embedded is not None:
            await self.embedded.service.start()

    async def close(self) -> None:
        await self.on_demand.close()
        await self.jobs.close()
        if self.embedded is not None:
            await self.embedded.service.close()
