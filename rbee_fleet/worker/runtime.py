"""The state of one worker process: its model, its lifecycle state, its counters."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from rbee_fleet import __version__
from rbee_fleet.common.errors import ModelNotFound, Unavailable
from rbee_fleet.contracts.fleet import WorkerHeartbeat, WorkerState
from rbee_fleet.worker.admission import Admission, TokenMeter
from rbee_fleet.worker.backends import Backend, WorkerSpec, load_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    spec: WorkerSpec
    worker_id: str
    hive_id: str
    host: str
    port: int
    advertise_url: str
    queen_url: str | None = None
    token: str | None = None  # the cluster token: required on our endpoints, sent on heartbeats
    heartbeat_interval_s: float = 5.0
    drain_timeout_s: float = 10.0
    exit_with_parent: bool = False

    def heartbeat(self, state: WorkerState, started_at: float, **load: Any) -> WorkerHeartbeat:
        """This worker's heartbeat: who it is (its settings), its state, and what its engine reports
        (``load``: slots, tokens, capabilities …). Both kinds of worker build theirs here."""
        spec = self.spec
        return WorkerHeartbeat(worker_id=self.worker_id, hive_id=self.hive_id, model=spec.model_id,
                               backend=spec.backend, device=spec.device, url=self.advertise_url, state=state,
                               pid=os.getpid(), version=__version__, started_at=started_at, **load)


class Runtime:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.spec = settings.spec
        self.state = WorkerState.LOADING
        self.error: str | None = None
        self.backend: Backend | None = None
        self.admission: Admission | None = None
        self.meter = TokenMeter()
        self.requests_total = 0
        self.started_at = time.time()
        self.changed = asyncio.Event()

    def set_state(self, state: WorkerState, error: str | None = None) -> None:
        self.state = state
        self.error = error
        self.changed.set()
        log.info("worker %s is %s%s", self.settings.worker_id, state.value, f": {error}" if error else "")

    async def load(self) -> None:
        """Load the model off the event loop; ``ready`` once done, ``failed`` with the reason if not."""
        try:
            backend = await asyncio.to_thread(load_backend, self.spec)
        except Exception as exc:  # noqa: BLE001 - reported through state, health and heartbeat
            self.set_state(WorkerState.FAILED, str(exc))
            return
        self.backend = backend
        self.admission = Admission(backend.slots, self.spec.max_queue)
        self.set_state(WorkerState.READY)

    def serving(self, model: str) -> tuple[Backend, Admission]:
        """The backend for a request naming ``model``, or the error that says why not."""
        if model != self.spec.model_id:
            raise ModelNotFound(
                f"this worker serves {self.spec.model_id!r}, not {model!r}", param="model"
            )
        if self.state is WorkerState.LOADING:
            raise Unavailable("the model is still loading", code="model_loading", retry_after=2)
        if self.state is not WorkerState.READY or self.backend is None or self.admission is None:
            raise Unavailable(f"the worker is {self.state.value}", code="worker_unavailable", retry_after=5)
        return self.backend, self.admission

    async def refresh(self) -> None:
        """Nothing to read before a heartbeat: this process holds its own counters."""

    def heartbeat(self) -> WorkerHeartbeat:
        adm = self.admission
        stats = self.backend.stats() if self.backend is not None else {}
        return self.settings.heartbeat(
            self.state, self.started_at,
            slots_busy=adm.busy if adm else 0,
            slots_total=adm.slots if adm else (self.backend.slots if self.backend else 1),
            queue_depth=adm.waiting if adm else 0,
            queue_capacity=self.spec.max_queue,
            tokens_per_second=round(self.meter.rate(), 2),
            tokens_generated_total=self.meter.total,
            tokens_decoded_total=self.backend.decoded_total if self.backend else 0,
            requests_total=self.requests_total,
            context_length=self.backend.context_length if self.backend else 0,
            capabilities=list(self.backend.capabilities) if self.backend else [],
            **stats,
        )
