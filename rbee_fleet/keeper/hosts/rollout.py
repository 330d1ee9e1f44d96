"""Rolling, health-gated deploys: hosts in batches, each gated, a failing host switched back, a stop
after too many failures.

Hosts go in batches (``--batch N`` or ``--batch 25%``; default: all at once), each batch's hosts in
parallel up to ``--parallel``. A host that changed counts as done only when it passes the health gate
(``health_gate``); one that fails it, or whose deploy fails after its version was switched, is switched
back to the version it ran before (no reinstall: the previous version is kept on the host), its workers
are brought back, and the failed version is removed from it. After a batch, when ``--max-fail`` hosts have failed, the rollout stops: the
hosts not yet started are left untouched and reported ``skipped``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from rbee_fleet.contracts.vocabulary import StepAction
from rbee_fleet.deploy.errors import DeployError
from rbee_fleet.deploy.plan import HostSpec
from rbee_fleet.deploy.rollback import switch_back
from rbee_fleet.deploy.runner import CHANGED, FAILED, SKIPPED, HostResult, RunContext, run_hosts
from rbee_fleet.keeper.hosts.health_gate import GateFailed

Job = Callable[[HostSpec, HostResult], Awaitable[None]]
Gate = Callable[[HostSpec], Awaitable[None]]  # raises GateFailed

_BATCH = re.compile(r"^\s*(\d+)\s*(%?)\s*$")


@dataclass(frozen=True)
class RolloutPolicy:
    batch: str | None = None  # "N" hosts, or "P%" of the hosts, per batch; None: all at once
    max_fail: int | None = None  # stop after this many failed hosts; None: never stop

    def batch_size(self, hosts: int) -> int:
        return batch_size(self.batch, hosts)


def batch_size(text: str | None, hosts: int) -> int:
    """Hosts per batch for ``--batch`` (``N`` or ``P%``, at least one host); ``ValueError`` for a bad value."""
    if text is None:
        return max(1, hosts)
    m = _BATCH.match(text)
    if not m or int(m.group(1)) == 0 or (m.group(2) and int(m.group(1)) > 100):
        raise ValueError(f"--batch {text!r}: give a number of hosts (2) or a percentage of them (25%)")
    n = int(m.group(1))
    return max(1, math.ceil(hosts * n / 100)) if m.group(2) else n


async def rollout(specs: list[HostSpec], job: Job, run: RunContext, *, parallel: int, policy: RolloutPolicy,
                  gate: Gate | None, results: list[HostResult] | None = None) -> list[HostResult]:
    """Deploy ``specs`` by ``job`` in batches, gating each changed host; results in inventory order."""
    if results is None:
        results = [HostResult(s.alias) for s in specs]
    size = policy.batch_size(len(specs))
    pairs = list(zip(specs, results))

    async def gated(spec: HostSpec, result: HostResult) -> None:
        await job(spec, result)
        if run.check or gate is None:
            return
        if result.status == CHANGED:
            try:
                run.update(spec.alias, "health gate: hive, workers, a test completion through the queen")
                await gate(spec)
                result.gate = "passed"
                return
            except GateFailed as exc:
                result.gate = exc.output
                result.status, result.reason, result.error_kind = FAILED, str(exc), "health-gate"
        if result.status == FAILED and _switched(result):
            await _switch_back(spec, result, run, gate)

    for start in range(0, len(pairs), size):
        failed = sum(r.status == FAILED for r in results)
        if policy.max_fail is not None and failed >= policy.max_fail:
            for _, r in pairs[start:]:
                r.status = SKIPPED
                r.reason = f"not started: the rollout stopped after {failed} failed host(s) (--max-fail {policy.max_fail})"
                run.update(r.alias, r.reason)
            break
        batch = pairs[start:start + size]
        await run_hosts([s for s, _ in batch], gated, parallel, run, [r for _, r in batch])
    return results


def _switched(result: HostResult) -> bool:
    """Whether this run moved the host off the version it ran (then a failure sends it back)."""
    return bool(result.previous and result.version and result.previous != result.version
                and result.plan is not None and result.plan.has(StepAction.SWITCH))


async def _switch_back(spec: HostSpec, result: HostResult, run: RunContext, gate: Gate | None) -> None:
    assert result.previous is not None
    run.update(spec.alias, f"failed on {result.version}: switching back to {result.previous}")
    try:
        now, _ = await switch_back(spec, run, to=result.previous, drop_failed=True)
        if run.ensure_workers is not None:
            await run.ensure_workers(spec)
        result.rolled_back_to = now
        after = "; it serves again" if gate is None else ""
        if gate is not None:
            try:
                await gate(spec)
                after = "; it passes the health gate there"
            except GateFailed as exc:
                after = f"; it fails there too: {exc}"
        result.reason += f" (switched back to {now}{after})"
    except DeployError as exc:
        result.reason += f" (switching back to {result.previous} failed: {exc.reason})"
