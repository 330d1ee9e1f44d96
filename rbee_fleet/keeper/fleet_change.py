"""Around every operation that changes the fleet: the fleet lock first, an audit entry at the end.

``FleetChanges.change(action, targets)`` is what ``HostService`` (deploy, install, upgrade, start, stop,
restart, uninstall, down --fleet, and any other fleet-wide action) and ``QueenService`` (workers and models,
audited only) wrap their work in. Nested changes in one task (a TUI install that deploys) lock and audit
once, as the outermost one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from rbee_fleet.keeper.audit import AUDIT_FILE, AuditLog
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.deploy_lock import FleetLock, FleetLocked, inventory_name

log = logging.getLogger(__name__)

_inside: contextvars.ContextVar[bool] = contextvars.ContextVar("rbee_fleet_change", default=False)


def audit_log(ctx: KeeperContext) -> AuditLog:
    """``$RBEE_HOME/audit.jsonl``, scrubbing the cluster token and every API key the keeper knows."""
    secrets = [ctx.cluster_token(), os.environ.get("RBEE_API_KEY"), *ctx.inventory.queen.effective_api_keys()]
    return AuditLog(ctx.layout.home / AUDIT_FILE, secrets, inventory=inventory_name(ctx.inventory_path))


def fleet_lock(ctx: KeeperContext, warn: Callable[[str], None] | None = None) -> FleetLock:
    return FleetLock(ctx.layout.home, ctx.inventory_path, warn)


@dataclass
class Change:
    """What the wrapped operation reports for its audit entry (ok unless it says or raises otherwise)."""

    result: str = "ok"
    reason: str = ""
    exit_code: int | None = None
    details: dict[str, str] = field(default_factory=dict)
    results: list[Any] | None = None  # per-host results (``HostResult``), read when the operation ends

    def failed(self, reason: str) -> None:
        self.result, self.reason = "failed", reason

    def _from_results(self) -> None:
        if not self.results:
            return
        for r in self.results:
            self.details[r.alias] = r.status + (f": {r.reason}" if r.status not in ("ok", "changed") and r.reason else "")
        bad = [r for r in self.results if r.status not in ("ok", "changed")]
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.status] = counts.get(r.status, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in counts.items())
        if bad and self.result == "ok":
            self.result = "cancelled" if all(r.status == "cancelled" for r in bad) else "failed"
        if not self.reason:
            self.reason = summary + (f"; {bad[0].alias}: {bad[0].reason}" if bad and bad[0].reason else "")


class FleetChanges:
    """The fleet lock and the audit log of one keeper context."""

    def __init__(self, ctx: KeeperContext, *, wait_s: float = 0.0, warn: Callable[[str], None] | None = None) -> None:
        self.ctx = ctx
        self.wait_s = wait_s
        self.warn = warn or log.warning
        self.audit = audit_log(ctx)

    def lock(self) -> FleetLock:
        return fleet_lock(self.ctx, lambda message: self.warn(message))

    async def wait_free(self, operation: str) -> None:
        """Refuse (or wait, ``wait_s``) now when another operation holds the lock: before a front end starts
        anything slow for an operation (the local queen, a build) that would be refused later anyway."""
        if _inside.get():
            return
        lock = self.lock()
        await lock.acquire(operation, self.wait_s)
        lock.release()

    @contextlib.asynccontextmanager
    async def change(self, action: str, targets: Iterable[str], *, lock: bool = True) -> AsyncIterator[Change]:
        """Hold the fleet lock (``FleetLocked`` at once, or after ``wait_s``) while the operation runs, then
        append its audit entry: ok, failed (the exception's first line) or cancelled."""
        change = Change()
        if _inside.get():
            yield change  # the outer change locks and audits
            return
        targets = list(targets)
        held = self.lock() if lock else None
        if held is not None:
            await held.acquire(f"{action} {','.join(targets)}".strip(), self.wait_s)
        token = _inside.set(True)
        try:
            yield change
        except FleetLocked:
            raise
        except (asyncio.CancelledError, KeyboardInterrupt):
            change._from_results()
            change.result, change.reason = "cancelled", change.reason or "interrupted"
            self._record(action, targets, change)
            raise
        except Exception as exc:
            change._from_results()
            change.failed(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            self._record(action, targets, change)
            raise
        else:
            change._from_results()
            self._record(action, targets, change)
        finally:
            _inside.reset(token)
            if held is not None:
                held.release()

    def _record(self, action: str, targets: list[str], change: Change) -> None:
        self.audit.record(action, targets, change.result, change.reason, exit_code=change.exit_code,
                          details=change.details)
