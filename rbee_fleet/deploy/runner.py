"""Deploying many hosts: in parallel (bounded), each on its own connection, each with its own result.

One host's failure never stops the others: every host ends ``ok`` (nothing changed), ``changed`` or
``failed`` with a one-line reason. Ctrl-C cancels the run between remote commands; as ``current`` is
switched atomically, each host is left on its old version or on its new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from rbee_fleet.contracts.vocabulary import StepAction
from rbee_fleet.deploy import steps
from rbee_fleet.deploy.connect import open_transport
from rbee_fleet.deploy.converge import WorkerChange
from rbee_fleet.deploy.errors import DeployError, WheelhouseError
from rbee_fleet.deploy.facts import HostFacts
from rbee_fleet.deploy.host_keys import HostKeyStore
from rbee_fleet.deploy.plan import HostPlan, HostSpec, plan_host
from rbee_fleet.deploy.transport import Transport
from rbee_fleet.deploy.wheelhouse import Release, WheelhouseBuilder

log = logging.getLogger(__name__)

OK, CHANGED, FAILED, CANCELLED, SKIPPED = "ok", "changed", "failed", "cancelled", "skipped"

# Brings the host's workers to the inventory through the queen (start, replace, stop); returns the changes.
EnsureWorkers = Callable[[HostSpec], Awaitable[list[WorkerChange]]]
# What that would change (check mode); the flag says the hive restarts first, so no worker survives.
PlanWorkers = Callable[[HostSpec, bool], Awaitable[list[WorkerChange]]]
Update = Callable[[str, str], None]  # (alias, what the host is doing now)


@dataclass
class HostResult:
    alias: str
    status: str = "pending"  # ok | changed | failed | cancelled | skipped
    reason: str = ""
    error_kind: str | None = None
    steps: list[str] = field(default_factory=list)  # what was (or, in check mode, would be) changed
    version: str | None = None
    elapsed_s: float = 0.0
    plan: HostPlan | None = field(default=None, repr=False)  # every step, changing or not (for a check view)
    workers: list[WorkerChange] = field(default_factory=list)  # worker changes made (or, checking, to make)
    previous: str | None = None  # the version the host ran before this run (what a failed gate goes back to)
    gate: str | None = None  # the health gate's result: "passed", or the failing check's output
    rolled_back_to: str | None = None  # the version a failed host was switched back to

    @property
    def ok(self) -> bool:
        return self.status in (OK, CHANGED)

    @property
    def changed(self) -> bool:
        return self.status == CHANGED

    @property
    def error(self) -> str | None:
        """Why the host failed (None when it did not)."""
        return None if self.ok else self.reason

    def to_json(self) -> dict[str, Any]:
        return {"host": self.alias, "status": self.status, "reason": self.reason, "error": self.error_kind,
                "changes": self.steps, "workers": [c.to_json() for c in self.workers], "version": self.version,
                "previous": self.previous, "gate": self.gate, "rolled_back_to": self.rolled_back_to,
                "elapsed_s": round(self.elapsed_s, 2)}


@dataclass
class RunContext:
    release: Release
    builder: WheelhouseBuilder
    keys: HostKeyStore
    token: str
    accept_new: bool = False
    check: bool = False
    ensure_workers: EnsureWorkers | None = None
    plan_workers: PlanWorkers | None = None
    update: Update = lambda alias, message: None


async def open_host(spec: HostSpec, ctx: RunContext) -> tuple[Transport, HostFacts]:
    ctx.update(spec.alias, f"connecting to {spec.target.describe()}")
    t = await open_transport(spec.target, ctx.keys, accept_new=ctx.accept_new)
    try:
        ctx.update(spec.alias, "checking the host")
        return t, await steps.gather_facts(t, spec)
    except BaseException:
        await t.close()
        raise


async def deploy_host(spec: HostSpec, ctx: RunContext, result: HostResult, *, require_installed: bool = False) -> None:
    """Bring one host to ``spec``; fills ``result`` (raises only on cancellation)."""
    t: Transport | None = None
    try:
        t, facts = await open_host(spec, ctx)
        ctx.update(spec.alias, facts.summary())
        if require_installed and not facts.versions:
            raise DeployError(spec.alias, "rbee-fleet is not installed there; use `hive install` first")
        plan = plan_host(spec, facts, ctx.release.id, ctx.token)
        result.version, result.plan, result.previous = plan.release_id, plan, facts.current
        if plan.problems:
            raise DeployError(spec.alias, "; ".join(plan.problems))
        result.steps = [s.detail for s in plan.steps if s.changes]
        if ctx.check:
            if ctx.plan_workers is not None:
                restarts = plan.has(StepAction.START) or plan.has(StepAction.RESTART)
                result.workers = [c for c in await ctx.plan_workers(spec, restarts) if c.changes]
            worker_lines = [c.describe() for c in result.workers]
            result.steps += worker_lines
            changes = [s.detail for s in plan.steps if s.changes] + worker_lines
            result.status = CHANGED if changes else OK
            result.reason = ("would " + "; ".join(changes)) if changes else "nothing to change"
            return
        await steps.execute(t, spec, facts, plan, ctx.release, ctx.builder, ctx.token,
                            lambda message: ctx.update(spec.alias, message))
        if ctx.ensure_workers is not None:
            ctx.update(spec.alias, f"bringing {len(spec.workers)} declared worker(s) to the inventory through the queen")
            result.workers = await ctx.ensure_workers(spec)
            result.steps += [c.describe(done=True) for c in result.workers]
        changes = [s.detail for s in plan.steps if s.changes] + [c.describe(done=True) for c in result.workers]
        result.status = CHANGED if changes else OK
        result.reason = "; ".join(changes) if changes else "nothing to change"
    except DeployError as exc:
        result.status, result.reason, result.error_kind = FAILED, exc.reason, exc.kind
    except WheelhouseError as exc:
        result.status, result.reason, result.error_kind = FAILED, str(exc).splitlines()[0], "wheelhouse"
    except asyncio.CancelledError:
        result.status, result.reason = CANCELLED, "interrupted"
        raise
    except Exception as exc:
        log.exception("deploying %s failed unexpectedly", spec.alias)
        result.status, result.reason, result.error_kind = FAILED, f"internal error: {type(exc).__name__}: {exc}", "internal"
    finally:
        if t is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(t.close())


async def run_hosts(specs: list[HostSpec], job: Callable[[HostSpec, HostResult], Awaitable[None]],
                    parallel: int, ctx: RunContext, results: list[HostResult] | None = None) -> list[HostResult]:
    """Run ``job`` for every host, at most ``parallel`` at a time; results in inventory order.

    Pass ``results`` to keep them when the run is cancelled (Ctrl-C): unfinished hosts say so.
    """
    limit = asyncio.Semaphore(max(1, parallel))
    if results is None:
        results = [HostResult(s.alias) for s in specs]

    async def one(spec: HostSpec, result: HostResult) -> None:
        async with limit:
            started = time.monotonic()
            result.status = "running"
            try:
                await job(spec, result)
            except DeployError as exc:
                result.status, result.reason, result.error_kind = FAILED, exc.reason, exc.kind
            finally:
                result.elapsed_s = time.monotonic() - started
                ctx.update(spec.alias, result.reason)

    tasks = [asyncio.ensure_future(one(s, r)) for s, r in zip(specs, results)]
    try:
        await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if r.status in ("pending", "running"):
                r.status, r.reason = CANCELLED, "interrupted before it finished"
        raise
    return results
