"""Which workers a host must start, replace or stop to match the inventory: computed from the hive's own
list of its workers, no I/O.

A worker a deploy spawned carries ``declared_as``, the inventory's id for it: a replacement runs under
another id (``ID`` and ``ID.2`` take turns) while the old process still serves, so both count as the
same declared worker. A worker counts as changed when the settings it was spawned with differ from the
inventory's; workers a deploy spawned whose id the inventory no longer declares are stopped. Workers
spawned by hand or loaded on demand carry no ``declared_as`` and are never touched; a worker that records
no settings (an older hive's) is kept as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rbee_fleet.contracts.fleet import SupervisedWorker, WorkerSpawnOp

Action = Literal["ok", "start", "replace", "stop"]
REPLACEMENT_SUFFIX = ".2"


@dataclass(frozen=True)
class WorkerChange:
    action: Action
    declared: str  # the inventory's id (or, for a stop, the id of a worker the inventory no longer has)
    model: str
    running: str | None = None  # the worker process serving it now, if any
    new_id: str | None = None  # what a start or replacement runs as
    changed: tuple[str, ...] = ()  # "ctx_size 512 -> 1024", for a replacement
    op: WorkerSpawnOp | None = field(default=None, repr=False)  # what to spawn, for start and replace

    @property
    def changes(self) -> bool:
        return self.action != "ok"

    def describe(self, done: bool = False) -> str:
        """One line: ``replace w (ctx_size 512 -> 1024)``; ``done`` words it as having happened."""
        verbs = {"ok": ("keep", "kept"), "start": ("start", "started"), "replace": ("replace", "replaced"),
                 "stop": ("stop", "stopped")}
        verb = verbs[self.action][1 if done else 0]
        if self.action == "replace":
            return f"{verb} worker {self.running} by {self.new_id} ({', '.join(self.changed)})"
        if self.action == "stop":
            return f"{verb} worker {self.running} (no longer in the inventory)"
        if self.action == "start":
            return f"{verb} worker {self.new_id} ({self.model})"
        return f"{verb} worker {self.running} ({self.model})"

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "worker": self.declared, "model": self.model, "running": self.running,
                "new_id": self.new_id, "changed": list(self.changed)}


def differences(declared: dict[str, Any], running: dict[str, Any]) -> tuple[str, ...]:
    """Each setting that differs, as ``key old -> new`` (old ``?`` when the worker did not say)."""
    out = []
    for key in sorted(set(declared) | set(running)):
        want, have = declared.get(key), running.get(key)
        if want != have:
            out.append(f"{key} {'?' if key not in running else _show(have)} -> {_show(want)}")
    return tuple(out)


def _show(value: Any) -> str:
    return "default" if value is None else str(value)


def replacement_id(declared: str, running: str) -> str:
    """The id a replacement runs under: the declared id and ``ID.2`` take turns."""
    return declared + REPLACEMENT_SUFFIX if running == declared else declared


def plan_workers(ops: list[WorkerSpawnOp], running: list[SupervisedWorker]) -> list[WorkerChange]:
    """What brings the hive's workers (``running``, its own list) to the declared ``ops``."""
    alive = [w for w in running if not w.state.gone]
    declared_ids = {op.declared_as or op.worker_id for op in ops}
    changes: list[WorkerChange] = []
    claimed: set[str] = set()
    for op in ops:
        wid = op.declared_as or op.worker_id
        assert wid is not None
        mine = [w for w in alive if (w.declared_as or w.worker_id) == wid]
        want = op.settings()
        # A worker that records no settings (spawned by an older hive) cannot be compared: it is kept.
        same = [w for w in mine if w.settings == want or not w.settings]
        if same:
            keep = same[0]
            changes.append(WorkerChange("ok", wid, op.model, running=keep.worker_id))
        elif mine:
            old = mine[0]
            keep = old
            new_id = replacement_id(wid, old.worker_id)
            changes.append(WorkerChange("replace", wid, op.model, running=old.worker_id, new_id=new_id,
                                        changed=differences(want, old.settings),
                                        op=op.model_copy(update={"worker_id": new_id, "declared_as": wid})))
        else:
            keep = None
            changes.append(WorkerChange("start", wid, op.model, new_id=wid,
                                        op=op.model_copy(update={"worker_id": wid, "declared_as": wid})))
        claimed.update(w.worker_id for w in mine if w is keep)
        # Left over from an interrupted replacement: a second process for the same declared worker.
        for extra in mine:
            if extra is not keep:
                claimed.add(extra.worker_id)
                changes.append(WorkerChange("stop", wid, extra.model, running=extra.worker_id))
    for w in alive:
        if w.worker_id in claimed or w.declared_as is None or w.declared_as in declared_ids:
            continue
        changes.append(WorkerChange("stop", w.declared_as, w.model, running=w.worker_id))
    return changes
