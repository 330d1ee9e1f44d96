"""What the queen knows about hives and workers, fed by their heartbeats.

A worker is live while its heartbeats arrive within the timeout; a live, ready worker is in rotation.
One that falls silent is out of rotation until it speaks again. Liveness is computed when asked,
so no timer has to run for a worker to leave rotation.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from rbee_fleet.common.errors import BadRequest, ContextOverflow
from rbee_fleet.contracts.capabilities import INFILL, LEGACY, missing
from rbee_fleet.contracts.fleet import (
    DeviceInfo,
    HiveHeartbeat,
    HiveView,
    ModelEntry,
    SupervisedWorker,
    WorkerHeartbeat,
    WorkerPulse,
    WorkerState,
    WorkerView,
)

log = logging.getLogger(__name__)

FORGET_AFTER_TIMEOUTS = 20  # a silent worker is forgotten after this many heartbeat timeouts
GONE_REMEMBERED = 1000

WorkerInstance = tuple[str, int, float]  # worker id, pid, process start time


@dataclass
class WorkerRecord:
    hb: WorkerHeartbeat
    last_seen: float
    in_flight: int = 0  # requests the queen has sent and not yet seen finish
    live_reported: bool = True
    last_used: float = 0.0  # monotonic time a request last started or ended on it
    pulsing: bool = False  # its pulses arrive: it is judged by the short pulse timeout

    @property
    def id(self) -> str:
        return self.hb.worker_id

    @property
    def instance(self) -> WorkerInstance:
        """This process of the worker: a restart under the same id is another instance, with its own record."""
        return (self.hb.worker_id, self.hb.pid, self.hb.started_at)

    def excluded_by(self, exclude: Collection[object]) -> bool:
        """Whether ``exclude`` names this instance (or, by its id, every instance of the worker)."""
        return self.instance in exclude or self.id in exclude

    def free_slots(self) -> int:
        return self.hb.slots_total - self.in_flight

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset(self.hb.capabilities) if self.hb.capabilities else LEGACY


@dataclass
class HiveRecord:
    hive_id: str
    url: str
    version: str
    embedded: bool
    devices: DeviceInfo
    workers: list[SupervisedWorker] = field(default_factory=list)
    models: list[ModelEntry] = field(default_factory=list)
    last_seen: float = 0.0


class Registry:
    def __init__(self, heartbeat_timeout_s: float, pulse_timeout_s: float | None = None) -> None:
        self.timeout = heartbeat_timeout_s
        self.pulse_timeout = pulse_timeout_s
        self.workers: dict[str, WorkerRecord] = {}
        self.hives: dict[str, HiveRecord] = {}
        # Worker instances (id -> (pid, start time)) that said goodbye: a heartbeat of theirs that was
        # already on the wire must not bring them back. A restarted worker is a new instance.
        self._gone: OrderedDict[str, tuple[int, float]] = OrderedDict()
        # Workers being unloaded: out of rotation, whatever their heartbeats still say.
        self.withheld: set[str] = set()
        # Called whenever capacity may have appeared (a worker became ready); the scheduler listens.
        self.on_capacity: list[Callable[[], None]] = []

    # -- updates ---------------------------------------------------------------------------------

    def worker_heartbeat(self, hb: WorkerHeartbeat) -> None:
        now = time.monotonic()
        rec = self.workers.get(hb.worker_id)
        instance = (hb.pid, hb.started_at)
        if hb.state is WorkerState.STOPPED:
            self._gone[hb.worker_id] = instance
            while len(self._gone) > GONE_REMEMBERED:
                self._gone.popitem(last=False)
            if rec is not None and (rec.hb.pid, rec.hb.started_at) == instance:  # not a newer process's record
                del self.workers[hb.worker_id]
                log.info("worker %s stopped; out of rotation", hb.worker_id)
            return
        if self._gone.get(hb.worker_id) == instance:
            return  # a late heartbeat from an instance that already said goodbye
        if rec is not None and (rec.hb.pid, rec.hb.started_at) != instance:
            # A new process under the same id: a fresh record, so that it starts with nothing in flight
            # (the old process's requests release the old record) and retries that excluded the old
            # process may use it at once.
            log.info("worker %s restarted (pid %d -> %d)", hb.worker_id, rec.hb.pid, hb.pid)
            rec = None
        if rec is None:
            self.workers[hb.worker_id] = WorkerRecord(hb=hb, last_seen=now)
            log.info("worker %s registered: %s on %s at %s (%s)", hb.worker_id, hb.model, hb.device, hb.url, hb.state.value)
            self._wake()
            return
        was_ready = self.in_rotation(rec, now)
        rec.hb = hb
        rec.last_seen = now
        if not rec.live_reported:
            rec.live_reported = True
            log.info("worker %s is back (%s)", hb.worker_id, hb.state.value)
        if self.in_rotation(rec, now) and not was_ready:
            self._wake()

    def worker_pulse(self, pulse: WorkerPulse) -> bool:
        """A pulse from a worker process: alive. False when the queen has no record of that process."""
        rec = self.workers.get(pulse.worker_id)
        if rec is None or (rec.hb.pid, rec.hb.started_at) != (pulse.pid, pulse.started_at):
            return False
        now = time.monotonic()
        was_ready = self.in_rotation(rec, now)
        rec.last_seen = now
        rec.pulsing = True
        if not rec.live_reported:
            rec.live_reported = True
            log.info("worker %s is back (pulse)", rec.id)
        if self.in_rotation(rec, now) and not was_ready:
            self._wake()
        return True

    def withhold(self, worker_id: str) -> None:
        """Take a worker out of rotation whatever its heartbeats say (it is being unloaded)."""
        self.withheld.add(worker_id)

    def forget_worker(self, worker_id: str) -> None:
        """Drop a worker that was unloaded (its goodbye may not have come), and its withholding."""
        self.workers.pop(worker_id, None)
        self.withheld.discard(worker_id)

    def hive_heartbeat(self, hb: HiveHeartbeat) -> None:
        self.hives[hb.hive_id] = HiveRecord(
            hive_id=hb.hive_id, url=hb.url, version=hb.version, embedded=hb.embedded,
            devices=hb.devices, workers=hb.workers, models=hb.models, last_seen=time.monotonic(),
        )

    def forget_hive(self, hive_id: str) -> bool:
        """Forget a remote hive and its workers (the keeper uninstalled it); False if it was unknown.
        A hive that still runs registers again with its next heartbeat."""
        rec = self.hives.get(hive_id)
        if rec is None or rec.embedded:
            return False
        del self.hives[hive_id]
        for wid, worker in list(self.workers.items()):
            if worker.hb.hive_id == hive_id:
                del self.workers[wid]
        log.info("hive %s forgotten (uninstalled)", hive_id)
        return True

    def sweep(self) -> None:
        """Log workers that went silent, and forget the long-gone."""
        now = time.monotonic()
        for wid, rec in list(self.workers.items()):
            silent = now - rec.last_seen
            if silent > self.timeout_of(rec) and rec.live_reported:
                rec.live_reported = False
                log.warning("worker %s fell silent (%.1f s without a %s); out of rotation", wid, silent,
                            "pulse" if rec.pulsing else "heartbeat")
            if silent > self.timeout * FORGET_AFTER_TIMEOUTS:
                del self.workers[wid]

    def _wake(self) -> None:
        for listener in self.on_capacity:
            listener()

    # -- queries ---------------------------------------------------------------------------------

    def timeout_of(self, rec: WorkerRecord) -> float:
        """How long ``rec`` may stay silent: the pulse timeout once it pulses, else the heartbeat timeout."""
        return min(self.pulse_timeout, self.timeout) if rec.pulsing and self.pulse_timeout else self.timeout

    def is_live(self, rec: WorkerRecord, now: float | None = None) -> bool:
        return ((now or time.monotonic()) - rec.last_seen) <= self.timeout_of(rec)

    def in_rotation(self, rec: WorkerRecord, now: float | None = None) -> bool:
        return rec.hb.state is WorkerState.READY and self.is_live(rec, now) and rec.id not in self.withheld

    def serving(self, model: str, hive: str | None = None) -> list[WorkerRecord]:
        """Workers in rotation for ``model`` (``hive``: of that hive only)."""
        now = time.monotonic()
        return [r for r in self.workers.values() if r.hb.model == model and self.in_rotation(r, now)
                and (hive is None or r.hb.hive_id == hive)]

    def knows(self, model: str) -> bool:
        """Whether any registered worker serves ``model``, even one loading or silent for now."""
        return any(r.hb.model == model and r.hb.state is not WorkerState.FAILED for r in self.workers.values())

    def others(self, model: str, exclude: Collection[object], hive: str | None = None) -> list[WorkerRecord]:
        """Live workers of ``model`` (any state but failed) outside ``exclude`` (instances or ids), of
        ``hive`` only when given."""
        now = time.monotonic()
        return [r for r in self.workers.values() if r.hb.model == model and not r.excluded_by(exclude)
                and (hive is None or r.hb.hive_id == hive)
                and r.hb.state is not WorkerState.FAILED and self.is_live(r, now)]

    def capabilities_of(self, model: str) -> frozenset[str]:
        """What the live workers of ``model`` can serve, together."""
        now = time.monotonic()
        caps: frozenset[str] = frozenset()
        for r in self.workers.values():
            if r.hb.model == model and self.is_live(r, now) and r.hb.state is not WorkerState.FAILED:
                caps |= r.capabilities
        return caps

    def fim_tokens(self, model: str) -> list[str] | None:
        """The fill-in-the-middle markers of ``model``, from any worker of it that can fill in the middle."""
        for rec in self.workers.values():
            if rec.hb.model == model and INFILL in rec.capabilities and len(rec.hb.fim_tokens) == 3:
                return rec.hb.fim_tokens
        return None

    def refuse_unable(self, model: str, needs: dict[str, str]) -> None:
        """A 400 naming the field when no worker of ``model`` can honour the request (and some exist)."""
        workers = [r for r in self.workers.values() if r.hb.model == model and r.hb.state is not WorkerState.FAILED]
        if not workers or any(not missing(needs, r.capabilities) for r in workers):
            return
        # Name what the closest worker lacks, fields before whole endpoints.
        fields = min((missing(needs, r.capabilities) for r in workers), key=len)
        fields.sort(key=lambda f: f.startswith("/v1/"))
        backends = ", ".join(sorted({r.hb.backend for r in workers}))
        field = fields[0]
        if field.startswith("/v1/"):
            hint = " (start a worker with embeddings = true)" if field == "/v1/embeddings" else ""
            message = f"{model!r} runs on the {backends} backend, which does not serve {field}{hint}"
        elif field == "suffix":
            message = (f"'suffix' (fill-in-the-middle) is not supported for {model!r}: the model has no "
                       f"fill-in-the-middle tokens, or its {backends} backend cannot use them")
        else:
            message = f"'{field}' is not supported by the {backends} backend that serves {model!r}"
        raise BadRequest(message, param=None if field.startswith("/v1/") else field, code="unsupported_parameter")

    def refuse_over_context(self, model: str, max_tokens: int | None, param: str) -> None:
        """A 400 when ``max_tokens`` alone exceeds the context of every worker of ``model`` (as OpenAI does)."""
        if not max_tokens:
            return
        contexts = [r.hb.context_length for r in self.workers.values()
                    if r.hb.model == model and r.hb.state is not WorkerState.FAILED and r.hb.context_length]
        if contexts and max_tokens >= max(contexts):
            raise ContextOverflow(f"{param} is {max_tokens}, but {model!r} has a context of {max(contexts)} tokens "
                                  "per request, prompt included", param=param)

    def models(self) -> list[str]:
        now = time.monotonic()
        return sorted({r.hb.model for r in self.workers.values() if self.is_live(r, now)
                       and r.hb.state in (WorkerState.READY, WorkerState.LOADING)})

    def worker_views(self) -> list[WorkerView]:
        now = time.monotonic()
        return [
            WorkerView(heartbeat=r.hb, in_flight=r.in_flight, live=self.is_live(r, now), last_seen_s=round(now - r.last_seen, 2))
            for r in sorted(self.workers.values(), key=lambda r: r.id)
        ]

    def hive_views(self) -> list[HiveView]:
        now = time.monotonic()
        return [
            HiveView(
                hive_id=h.hive_id, url=h.url, version=h.version, embedded=h.embedded,
                live=h.embedded or now - h.last_seen <= self.timeout, last_seen_s=round(now - h.last_seen, 2),
                devices=h.devices, workers=h.workers, models=h.models,
            )
            for h in sorted(self.hives.values(), key=lambda h: h.hive_id)
        ]
