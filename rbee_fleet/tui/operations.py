"""Every operation the TUI started, with its events, so the Jobs screen can show and follow it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from rbee_fleet.contracts.fleet import JobEvent, JobState, Progress

# Operations that are one job on the queen (the others, like a hive start, may run several).
QUEEN_JOB_KINDS = frozenset({"worker_spawn", "worker_stop", "model_download", "model_delete"})


@dataclass
class TrackedOperation:
    op_id: int
    label: str  # what the operator sees: "spawn smollm2 on localhost"
    kind: str  # worker_spawn, hive_start, deploy, …
    hive: str | None
    started_at: float
    state: JobState = JobState.RUNNING
    job_id: str | None = None  # the queen's job, when the operation is one
    events: list[JobEvent] = field(default_factory=list)
    error: str | None = None
    result: dict[str, Any] | None = None
    worker: Any = None  # the Textual worker running it (to cancel it)

    @property
    def running(self) -> bool:
        return self.state is JobState.RUNNING

    @property
    def host_action(self) -> bool:
        """An action on a whole host (a hive's lifecycle, a deploy) rather than on a worker or model."""
        return self.hive is not None and (self.kind.startswith("hive_") or self.kind == "deploy")

    @property
    def progress(self) -> Progress | None:
        for event in reversed(self.events):
            if event.progress is not None:
                return event.progress
        return None

    @property
    def last_message(self) -> str:
        return self.error or (self.events[-1].message if self.events else "")

    def add(self, event: JobEvent) -> None:
        if event.job_id and self.job_id is None and self.kind in QUEEN_JOB_KINDS:
            self.job_id = event.job_id
        self.events.append(event)


class OperationLog:
    """The operations of this TUI session, newest last."""

    def __init__(self) -> None:
        self._ops: list[TrackedOperation] = []
        self._ids = itertools.count(1)

    def start(self, label: str, kind: str, hive: str | None, at: float) -> TrackedOperation:
        op = TrackedOperation(next(self._ids), label, kind, hive, at)
        self._ops.append(op)
        return op

    def __iter__(self):
        return iter(self._ops)

    def __len__(self) -> int:
        return len(self._ops)

    def get(self, op_id: int) -> TrackedOperation | None:
        return next((o for o in self._ops if o.op_id == op_id), None)

    def running(self) -> list[TrackedOperation]:
        return [o for o in self._ops if o.running]

    def busy_hosts(self) -> dict[str, str]:
        """Host alias -> the host action running on it (install, start, deploy, …)."""
        return {o.hive: o.kind.removeprefix("hive_") for o in self._ops if o.running and o.host_action and o.hive}
