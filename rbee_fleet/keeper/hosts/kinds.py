"""The two kinds of host, each with its own deploy, lifecycle action, health check, logs and plan.

``EmbeddedHost``: the hive on the queen's machine, which runs inside the local queen; deploying it is
starting that queen, stopping it stops the queen, its log is the queen's, and it answers through the
queen. ``InstalledHost``: a hive installed on a host (over SSH, or locally with ``transport = "local"``)
by ``deploy``'s steps, switched back on failure, controlled by its own control script. The host service
chooses the kind once, from the inventory; nothing outside these two asks which kind a host is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.contracts.fleet import FleetStatus
from rbee_fleet.contracts.vocabulary import HiveAction
from rbee_fleet.deploy.converge import plan_workers
from rbee_fleet.deploy.errors import DeployError
from rbee_fleet.deploy.plan import HostSpec
from rbee_fleet.deploy.runner import CHANGED, FAILED, OK, HostResult, RunContext, deploy_host
from rbee_fleet.deploy.targets import SSHTarget
from rbee_fleet.keeper.hosts.health_gate import health_gate, hive_answers_at_its_address, queen_answers
from rbee_fleet.keeper.local_queen import local_queen, stop_queen
from rbee_fleet.keeper.log_follow import follow_file
from rbee_fleet.keeper.queen_client import QueenUnreachable
from rbee_fleet.keeper.queen_service import EventSink, ensure_workers

if TYPE_CHECKING:
    from rbee_fleet.keeper.hosts.service import HostService, PlanStep


class EmbeddedHost:
    """The queen's own hive: nothing to install, switch or roll back; it lives and dies with the queen."""

    installed = False

    def __init__(self, service: HostService, spec: HostSpec) -> None:
        self.service = service
        self.spec = spec
        self.alias = spec.alias

    async def deploy(self, run: RunContext, result: HostResult, sink: EventSink | None,
                     queen_started: bool = False) -> None:
        """The local queen running (it is this hive), then its workers; ``queen_started``: this run's
        ``with_queen`` started it already."""
        svc, spec = self.service, self.spec
        up = await svc.queen.client.healthy()
        if run.check:
            if up and run.plan_workers is not None:
                result.workers = [c for c in await run.plan_workers(spec, False) if c.changes]
            changes = ([] if up else [f"start the queen at {svc.ctx.queen_url}"]) + [c.describe() for c in result.workers]
            result.steps = changes
            result.status = CHANGED if changes else OK
            result.reason = ("would " + "; ".join(changes)) if changes else "nothing to change"
            return
        try:
            say(sink, self.alias, f"starting the queen at {svc.ctx.queen_url}")
            started = await svc.start_local_queen() or queen_started
            if run.ensure_workers is not None:
                result.workers = await run.ensure_workers(spec)
        except (OperationFailed, QueenUnreachable) as exc:
            result.status, result.reason, result.error_kind = FAILED, str(exc), "local"
            return
        except DeployError as exc:
            result.status, result.reason, result.error_kind = FAILED, exc.reason, exc.kind
            return
        result.steps = ([f"started the queen at {svc.ctx.queen_url}"] if started else []) + \
            [c.describe(done=True) for c in result.workers]
        result.status = CHANGED if result.steps else OK
        result.reason = "; ".join(result.steps) if result.steps else "nothing to change"

    async def gate(self, run: RunContext) -> None:
        svc = self.service
        await health_gate(self.spec, svc.queen.client, svc.converger(run),
                          hive_check=lambda: queen_answers(self.spec, svc.queen.client))

    async def act(self, action: HiveAction, sink: EventSink | None) -> dict[str, Any]:
        """Start, stop or restart the local queen (with this hive and its workers)."""
        svc = self.service
        if action in (HiveAction.INSTALL, HiveAction.UPGRADE, HiveAction.UNINSTALL):
            raise OperationFailed(f"{self.alias} runs the embedded hive, part of this keeper's own rbee-fleet install: "
                                  f"{action.value} applies to remote hosts")
        result: dict[str, Any] = {}
        async with svc.changes.change(f"hive {action.value}", [self.alias]):
            if action in (HiveAction.STOP, HiveAction.RESTART):
                say(sink, self.alias, "stopping the local queen and its workers")
                result["stopped"] = await stop_queen(svc.ctx, svc.queen.client)
            if action in (HiveAction.START, HiveAction.RESTART):
                result.update(await self._start(sink))
        return result

    async def _start(self, sink: EventSink | None) -> dict[str, Any]:
        svc = self.service
        say(sink, self.alias, f"starting the queen at {svc.ctx.queen_url}")
        started = await svc.start_local_queen()
        say(sink, self.alias, "queen started" if started else "queen already running")
        results = await ensure_workers(svc.ctx, svc.queen.client, sink)
        failed = [f"{wid}: {err}" for wid, _, err in results if err]
        if failed:
            raise OperationFailed("; ".join(failed))
        changed = started or any((r or {}).get("changed") for _, r, _ in results)
        return {"started": started, "changed": changed, "workers": [wid for wid, _, _ in results]}

    def follow_log(self, lines: int) -> AsyncIterator[str]:
        return follow_file(local_queen(self.service.ctx).logfile, lines)

    def ssh_target(self, why_not: str) -> SSHTarget:
        raise OperationFailed(f"{self.alias} is the queen's own machine: {why_not}")

    def plan(self, status: FleetStatus | None) -> list[PlanStep]:
        """What a deploy would change here: the queen started if it is down, the declared workers spawned."""
        from rbee_fleet.keeper.hosts.service import PlanStep

        svc = self.service
        steps = [PlanStep(self.alias, "queen", "ok" if status else "change",
                          f"running at {svc.ctx.queen_url}" if status else f"start at {svc.ctx.queen_url}")]
        hive = next((h for h in status.hives if h.hive_id == self.alias), None) if status else None
        changes = ([c for c in plan_workers(svc.ctx.inventory.spawn_ops(self.alias), hive.workers) if c.changes]
                   if hive is not None else None)
        return steps + svc.worker_steps(self.alias, status, changes)


class InstalledHost:
    """A hive installed on a host by the deploy's steps, over the host's transport (SSH, or local processes)."""

    installed = True

    def __init__(self, service: HostService, spec: HostSpec) -> None:
        self.service = service
        self.spec = spec
        self.alias = spec.alias

    async def deploy(self, run: RunContext, result: HostResult, sink: EventSink | None,
                     queen_started: bool = False) -> None:
        await deploy_host(self.spec, run, result)

    async def gate(self, run: RunContext) -> None:
        svc = self.service
        converger = svc.converger(run)
        await health_gate(self.spec, svc.queen.client, converger,
                          hive_check=lambda: hive_answers_at_its_address(self.spec, converger.token))

    async def act(self, action: HiveAction, sink: EventSink | None) -> dict[str, Any]:
        """One lifecycle action, as one operation: install and upgrade are a health-gated deploy of this host."""
        svc = self.service
        run = svc.tui_run(sink)
        if action in (HiveAction.INSTALL, HiveAction.UPGRADE):
            await svc.with_queen(sink)
            (result,) = await svc.install([self.spec], run, upgrade=action is HiveAction.UPGRADE)
            if not result.ok:
                raise OperationFailed(f"{self.alias}: {result.reason}")
            return {"changed": result.status == CHANGED, "message": result.reason, "version": result.version}
        try:
            outcome = await svc.control(self.spec, run, action)
        except DeployError as exc:
            raise OperationFailed(f"{self.alias}: {exc.reason}") from None
        say(sink, self.alias, outcome.message)
        return {"changed": outcome.changed, "message": outcome.message}

    def ssh_target(self, why_not: str) -> SSHTarget:
        """How SSH reaches this host; a local one (``transport = "local"``) is not reached over SSH."""
        if not isinstance(self.spec.target, SSHTarget):
            raise OperationFailed(f'{self.alias} is on this machine (transport = "local"): it is not reached over SSH '
                                  "and has no host key")
        return self.spec.target

    async def follow_log(self, lines: int) -> AsyncIterator[str]:
        """``hive logs -f`` as an iterator: the connection lives as long as the iteration."""
        svc = self.service
        queue: asyncio.Queue[str] = asyncio.Queue()
        tail = asyncio.ensure_future(svc.logs(self.spec, svc.tui_run(None), lines, True, queue.put_nowait))
        getter: asyncio.Future[str] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, tail}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                while not queue.empty():
                    yield queue.get_nowait()
                try:
                    code = tail.result()
                except DeployError as exc:
                    raise OperationFailed(f"{self.alias}: {exc.reason}") from None
                yield f"(the log ended: tail exited with {code})"
                return
        finally:
            for task in (getter, tail):
                if task is not None:
                    task.cancel()
            await asyncio.gather(tail, return_exceptions=True)


Host = EmbeddedHost | InstalledHost


def say(sink: EventSink | None, label: str, message: str, error: bool = False) -> None:
    """Report a step of a host action through the same sink job events use."""
    if sink is None:
        return
    from rbee_fleet.contracts.fleet import JobEvent

    sink(label, JobEvent(job_id="", seq=0, type="error" if error else "log", message=message, ts=time.time()))
