"""Every action on a whole host, for the CLI and the TUI alike: install, upgrade, start, stop, restart,
uninstall, status, logs, plan and deploy, plus host keys and probes.

``HostService`` is the one service both front ends call, so an action means the same in both. The embedded
hive on the queen's machine lives and dies with the local queen; every other hive is installed, over SSH or,
on the operator's own machine, through the local transport, by the same steps.
A deploy runs every host, embedded or remote, through the same runner with the same per-host result, and
spawns each host's declared workers through the queen. Failures come back as ``DeployError`` (one line naming
the host and the cause) or, from the TUI's entry points, ``OperationFailed``; printing is the front ends'.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.inventory import HiveDecl, InventoryError
from rbee_fleet.common.secrets import load_or_create
from rbee_fleet.contracts.fleet import FleetStatus
from rbee_fleet.contracts.vocabulary import HiveAction, StepAction
from rbee_fleet.deploy.converge import WorkerChange, plan_workers
from rbee_fleet.deploy.errors import DeployError, WheelhouseError
from rbee_fleet.deploy.host_keys import HostKey, known_hosts_pattern
from rbee_fleet.deploy.hosts import host_spec, select
from rbee_fleet.deploy.plan import HostSpec
from rbee_fleet.deploy.rollback import switch_back
from rbee_fleet.deploy.runner import (
    CANCELLED,
    CHANGED,
    FAILED,
    OK,
    EnsureWorkers,
    HostResult,
    RunContext,
    Update,
    deploy_host,
    run_hosts,
)
from rbee_fleet.deploy.targets import SSHTarget
from rbee_fleet.deploy.wheelhouse import Release, WheelhouseBuilder
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.fleet_change import FleetChanges
from rbee_fleet.keeper.hosts.health_gate import GateFailed
from rbee_fleet.keeper.hosts.kinds import EmbeddedHost, Host, InstalledHost, say
from rbee_fleet.keeper.hosts.probe import PROBE_GRACE_S, HostProbe, probe_host
from rbee_fleet.keeper.hosts.remote_hive import HiveNotInstalled, HiveOutcome, control_hive, hive_status, stream_log
from rbee_fleet.keeper.hosts.rollout import RolloutPolicy, rollout
from rbee_fleet.keeper.hosts.worker_converge import WorkerConverger
from rbee_fleet.keeper.local_queen import start_queen, stop_queen
from rbee_fleet.keeper.queen_client import QueenUnreachable
from rbee_fleet.keeper.queen_service import EventSink, QueenService
from rbee_fleet.keeper.ssh_login import ssh_command

PARALLEL = 8  # hosts deployed or checked at a time


@dataclass(frozen=True)
class PlanStep:
    alias: str
    what: str  # the thing checked: "queen", "install", "start", a worker id, "host"
    status: Literal["ok", "change", "failed"]
    detail: str


def installed_specs(ctx: KeeperContext, limit: str | None, *, embedded: bool = False) -> list[HostSpec]:
    """The installed hives to act on (with ``embedded``, the embedded one too, first): all, or those of
    ``limit`` (``a,b``). A bad alias or jump host is an ``InventoryError``."""
    path = ctx.inventory_path or "<built-in inventory>"
    aliases = select(ctx.inventory, limit, path, embedded=embedded)
    try:
        return [host_spec(ctx.inventory, alias) for alias in aliases]
    except ValueError as exc:
        raise InventoryError(path, None, "proxy_jump", str(exc)) from None


def run_context(ctx: KeeperContext, *, source: Path | None = None, accept_new: bool = False, check: bool = False,
                update: Update | None = None, builders: dict[str, WheelhouseBuilder] | None = None,
                ensure_workers: EnsureWorkers | None = None) -> RunContext:
    """What a run over hosts' transports needs: the release to ship, the wheelhouse builder, host keys, the cluster token,
    where progress goes and how hosts' workers are spawned.

    Runs given the same ``builders`` share one builder per release: one build per wheelhouse."""
    release = Release.from_source(source)
    ctx.layout.ensure()
    builder = WheelhouseBuilder(release)
    if builders is not None:
        builder = builders.setdefault(release.id, builder)
    run = RunContext(release=release, builder=builder, keys=ctx.host_keys(),
                     token=load_or_create(ctx.layout.cluster_token), accept_new=accept_new, check=check,
                     ensure_workers=ensure_workers)
    if update is not None:
        run.update = update
    return run


# -- the service --------------------------------------------------------------------------------------


class HostService:
    """Host actions through the keeper: the embedded hive through the local queen, installed hosts over their
    transport (SSH, or local processes)."""

    def __init__(self, queen: QueenService) -> None:
        self.queen = queen
        self._queen_lock = asyncio.Lock()
        self._builders: dict[str, WheelhouseBuilder] = {}
        # The fleet lock and the audit log: every action that changes the fleet goes through ``changes.change``.
        self.changes = FleetChanges(queen.ctx)

    @property
    def ctx(self) -> KeeperContext:
        return self.queen.ctx

    def _decl(self, alias: str) -> HiveDecl:
        decl = self.ctx.inventory.hives.get(alias)
        if decl is None:
            raise OperationFailed(f"no host {alias!r} in the inventory")
        return decl

    def _spec(self, alias: str) -> HostSpec:
        self._decl(alias)
        try:
            return host_spec(self.ctx.inventory, alias)
        except ValueError as exc:  # a jump host that loops or cannot be parsed
            raise OperationFailed(f"{alias}: {exc}") from None

    def host(self, alias: str) -> Host:
        """The host of ``alias`` as its kind (the embedded hive, or an installed one); ``OperationFailed`` for
        an alias the inventory lacks."""
        return (EmbeddedHost if self._decl(alias).embedded else InstalledHost)(self, self._spec(alias))

    def specs(self, limit: str | None, *, embedded: bool = False) -> list[HostSpec]:
        """The inventory's installed hosts, and with ``embedded`` the embedded one first (``limit``: only these
        aliases); ``InventoryError`` for a bad one."""
        return installed_specs(self.ctx, limit, embedded=embedded)

    def run_context(self, sink: EventSink | None = None, *, update: Update | None = None, check: bool = False,
                    accept_new: bool = False, source: Path | None = None) -> RunContext:
        """A run whose progress goes to ``update`` (else to ``sink`` as log events) and which brings hosts'
        workers to the inventory through the queen (their job events to ``sink``), or in check mode says what
        that would change; raises ``WheelhouseError``."""
        run = run_context(self.ctx, source=source, accept_new=accept_new, check=check,
                          update=update or (lambda alias, message: say(sink, alias, message)), builders=self._builders)
        workers = self.converger(run, sink)

        async def plan(spec: HostSpec, restarts: bool) -> list[WorkerChange]:
            return plan_workers(list(spec.workers), []) if restarts else await workers.plan(spec)

        run.plan_workers = plan
        if not check:
            run.ensure_workers = workers.apply
        run.keys.on_record = lambda host, port, _key: self.changes.audit.record(
            "host-key accept", [known_hosts_pattern(host, port)], "ok", "trusted on first use (--accept-new-host-keys)")
        return run

    def converger(self, run: RunContext, sink: EventSink | None = None) -> WorkerConverger:
        embedded = {alias for alias, decl in self.ctx.inventory.hives.items() if decl.embedded}
        return WorkerConverger(self.queen.client, run.token, sink, run.update, embedded)

    def tui_run(self, sink: EventSink | None, *, check: bool = False) -> RunContext:
        """``run_context`` for the TUI: new host keys are never trusted implicitly; failures as ``OperationFailed``."""
        try:
            return self.run_context(sink, check=check)
        except WheelhouseError as exc:
            raise OperationFailed(str(exc)) from None

    async def with_queen(self, sink: EventSink | None = None) -> bool:
        """Hosts' workers are spawned through the local queen: start it unless it runs; True if it was started."""
        async with self._queen_lock:
            started, _ = await start_queen(self.ctx, self.queen.client)
        if started:
            say(sink, "queen", f"queen started at {self.ctx.queen_url}")
        return started

    async def start_local_queen(self) -> bool:
        """Start the local queen unless it answers (one start at a time); True if this call started it."""
        async with self._queen_lock:
            started, _ = await start_queen(self.ctx, self.queen.client)
        return started

    # -- hive lifecycle ----------------------------------------------------------------------------

    async def install(self, specs: list[HostSpec], run: RunContext, *, upgrade: bool = False,
                      results: list[HostResult] | None = None) -> list[HostResult]:
        """``hive install`` (or ``upgrade``, which needs an installed hive): a deploy of these hosts, one at a time,
        each health-gated (a failing host goes back to its previous version)."""
        results = results if results is not None else [HostResult(s.alias) for s in specs]
        async with self.changes.change(f"hive {'upgrade' if upgrade else 'install'}", [s.alias for s in specs]) as change:
            change.results = results
            return await rollout(specs, lambda s, r: deploy_host(s, run, r, require_installed=upgrade), run,
                                 parallel=1, policy=RolloutPolicy(), gate=lambda spec: self.host(spec.alias).gate(run),
                                 results=results)

    async def rollback(self, specs: list[HostSpec], run: RunContext, parallel: int = PARALLEL,
                       results: list[HostResult] | None = None) -> list[HostResult]:
        """Switch each host to its previous version (no reinstall), bring its workers back, then the health gate."""

        async def job(spec: HostSpec, result: HostResult) -> None:
            try:
                now, was = await switch_back(spec, run)
                result.version, result.previous = now, was
                if run.ensure_workers is not None:
                    result.workers = await run.ensure_workers(spec)
                await self.host(spec.alias).gate(run)
                result.gate = "passed"
                result.status = CHANGED if now != was else OK
                result.reason = f"switched to {now} (was {was})" if now != was else f"already on {now}"
            except GateFailed as exc:
                result.gate = exc.output
                result.status, result.reason, result.error_kind = FAILED, str(exc), "health-gate"
            except DeployError as exc:
                result.status, result.reason, result.error_kind = FAILED, exc.reason, exc.kind

        results = results if results is not None else [HostResult(s.alias) for s in specs]
        async with self.changes.change("rollback", [s.alias for s in specs]) as change:
            change.results = results
            return await run_hosts(specs, job, parallel, run, results)

    async def control(self, spec: HostSpec, run: RunContext, action: HiveAction) -> HiveOutcome:
        """Start, stop, restart or uninstall one remote hive (under the fleet lock, audited); an uninstalled
        hive is forgotten by the queen, so that ``status`` no longer shows it as a live hive."""
        action = HiveAction(action)
        async with self.changes.change(f"hive {action.value}", [spec.alias]) as change:
            outcome = await control_hive(spec, run, action)
            change.reason = outcome.message
        if action is HiveAction.UNINSTALL:
            await self.queen.forget_hive(spec.alias)
        return outcome

    async def status(self, spec: HostSpec, run: RunContext) -> dict[str, Any]:
        return await hive_status(spec, run)

    async def logs(self, spec: HostSpec, run: RunContext, lines: int, follow: bool,
                   on_line: Callable[[str], None]) -> int:
        return await stream_log(spec, run, lines, follow, on_line)

    async def hive(self, alias: str, action: HiveAction, sink: EventSink | None = None) -> dict[str, Any]:
        """One lifecycle action on one host, as one operation (the TUI's host menu); ``OperationFailed``."""
        return await self.host(alias).act(action, sink)

    # -- deploy ----------------------------------------------------------------------------------

    async def deploy_specs(self, specs: list[HostSpec], run: RunContext, parallel: int = PARALLEL,
                           results: list[HostResult] | None = None, sink: EventSink | None = None,
                           policy: RolloutPolicy | None = None, queen_started: bool = False) -> list[HostResult]:
        """Bring each host to the inventory's state, at most ``parallel`` at a time, in ``policy``'s batches;
        a failing host stops the others only at ``policy.max_fail``. An installed host is checked, installed
        and started over its transport (SSH, or local processes); the embedded one by starting the local
        queen; then each host's workers are brought to the inventory through the queen, and a host that
        changed passes the health gate or (an installed one) goes back to its previous version.
        ``queen_started``: the caller's ``with_queen`` started the local queen (the embedded host reports it)."""

        async def job(spec: HostSpec, result: HostResult) -> None:
            await self.host(spec.alias).deploy(run, result, sink, queen_started)

        if run.check:  # changes nothing: no lock, no audit entry, no gate
            return await rollout(specs, job, run, parallel=parallel, policy=policy or RolloutPolicy(), gate=None,
                                 results=results)
        results = results if results is not None else [HostResult(s.alias) for s in specs]
        async with self.changes.change("deploy", [s.alias for s in specs]) as change:
            change.results = results
            return await rollout(specs, job, run, parallel=parallel, policy=policy or RolloutPolicy(),
                                 gate=lambda spec: self.host(spec.alias).gate(run), results=results)

    async def deploy(self, aliases: list[str], sink: EventSink | None = None) -> list[HostResult]:
        """Deploy these hosts as the TUI does: new host keys are never trusted, and each failure is reported
        to ``sink`` as an error event."""
        try:
            hosts = [self.host(a) for a in aliases]
            specs = [h.spec for h in hosts]
            run = self.tui_run(sink)
            started = await self.with_queen(sink) if any(h.installed for h in hosts) else False
        except (OperationFailed, QueenUnreachable) as exc:
            results = [HostResult(a, FAILED, str(exc)) for a in aliases]
        else:
            results = await self.deploy_specs(specs, run, PARALLEL, sink=sink, queen_started=started)
        for r in results:
            if not r.ok:
                say(sink, r.alias, f"failed: {r.reason}", error=True)
        return results

    async def stop_fleet(self, specs: list[HostSpec], run: RunContext, parallel: int = PARALLEL,
                         results: list[HostResult] | None = None) -> list[HostResult]:
        """``down --fleet``: stop every installed hive with its workers over its transport, at most ``parallel`` at a time
        (one failing host never stops the others), then the local queen and its workers (the last result,
        ``queen``)."""
        results = results if results is not None else [HostResult(s.alias) for s in specs] + [HostResult("queen")]

        async def stop_one(spec: HostSpec, result: HostResult) -> None:
            try:
                outcome = await control_hive(spec, run, HiveAction.STOP)
            except HiveNotInstalled:
                result.status, result.reason = OK, "not installed: nothing to stop"
                return
            result.status, result.reason = (CHANGED if outcome.changed else OK), outcome.message

        async with self.changes.change("down --fleet", [*(s.alias for s in specs), "queen"]) as change:
            change.results = results
            await run_hosts(specs, stop_one, parallel, run, results[:len(specs)])
            queen = results[-1]
            run.update(queen.alias, "stopping the local queen and its workers (after draining)")
            started = time.monotonic()
            try:
                stopped = await stop_queen(self.ctx, self.queen.client)
            except OperationFailed as exc:
                queen.status, queen.reason = FAILED, str(exc)
            else:
                queen.status = CHANGED if stopped else OK
                queen.reason = "queen stopped" if stopped else "the queen was not running"
            queen.elapsed_s = time.monotonic() - started
            run.update(queen.alias, queen.reason)
        return results

    async def plan(self, aliases: list[str]) -> list[PlanStep]:
        """What a deploy would change on each host, changing nothing; installed hosts are checked over their transport."""
        status: FleetStatus | None
        try:
            status = await self.queen.status()
        except QueenUnreachable:
            status = None
        hosts = {a: self.host(a) for a in aliases}
        remote = [a for a, h in hosts.items() if h.installed]
        by_host = await self.plan_remote(remote, status) if remote else {}
        plan: list[PlanStep] = []
        for alias, host in hosts.items():
            plan += by_host[alias] if alias in by_host else host.plan(status)  # type: ignore[union-attr]
        return plan

    async def plan_remote(self, aliases: list[str], status: FleetStatus | None) -> dict[str, list[PlanStep]]:
        """The deploy's check mode: each step of each host's plan, ok or change, or why the host fails."""
        try:
            specs = [self._spec(a) for a in aliases]
            run = self.tui_run(None, check=True)
        except OperationFailed as exc:
            return {a: [PlanStep(a, "host", "failed", str(exc))] for a in aliases}
        by_host: dict[str, list[PlanStep]] = {}
        for r in await self.deploy_specs(specs, run, PARALLEL):
            if r.plan is None or r.status in (FAILED, CANCELLED):
                by_host[r.alias] = [PlanStep(r.alias, "host", "failed", r.reason)]
                continue
            host_steps: list[PlanStep] = []
            for step in r.plan.steps:
                if step.action is StepAction.WORKERS:
                    host_steps += self.worker_steps(r.alias, status, r.workers)
                else:
                    host_steps.append(PlanStep(r.alias, step.action, "change" if step.changes else "ok", step.detail))
            by_host[r.alias] = host_steps
        return by_host

    def worker_steps(self, alias: str, status: FleetStatus | None,
                      changes: list[WorkerChange] | None = None) -> list[PlanStep]:
        """The host's declared workers: serving already, or to be spawned through the queen; for a remote host
        checked over SSH, its converge plan's changes (start, replace, stop) and the workers it keeps."""
        if changes is not None:
            changed = {c.declared for c in changes}
            return ([PlanStep(alias, c.declared, "change", c.describe()) for c in changes]
                    + [PlanStep(alias, wid, "ok", f"serving {decl.model}")
                       for wid, decl in self.ctx.inventory.worker_plan(alias) if wid not in changed])
        ready = {w.heartbeat.worker_id for w in (status.workers if status else [])
                 if w.live and w.heartbeat.state.value in ("ready", "loading")}
        return [PlanStep(alias, wid, "ok", f"serving {decl.model}") if wid in ready
                else PlanStep(alias, wid, "change", f"spawn {decl.model} with {decl.backend} on {decl.device}")
                for wid, decl in self.ctx.inventory.worker_plan(alias)]

    # -- host keys -------------------------------------------------------------------------------

    def _ssh_target(self, alias: str, why_not: str) -> SSHTarget:
        """The SSH target of a host reached over SSH; ``OperationFailed`` for any other (``why_not`` says what
        the embedded host lacks)."""
        return self.host(alias).ssh_target(why_not)

    async def host_key(self, alias: str) -> HostKey:
        """The key the host (or its jump host, when that one is not trusted yet) presents; records nothing."""
        target = self._ssh_target(alias, "the keeper does not reach it over SSH")
        from rbee_fleet.deploy.ssh_transport import scan_host_key  # asyncssh only when a host key is asked for

        limit = target.connect_timeout_s + PROBE_GRACE_S
        try:
            return await asyncio.wait_for(scan_host_key(target, self.ctx.host_keys()), limit)
        except asyncio.TimeoutError:
            raise OperationFailed(f"{alias}: no answer over SSH within {limit:g} s") from None
        except DeployError as exc:
            raise OperationFailed(f"{alias}: {exc.reason}") from None

    async def accept_host_key(self, key: HostKey) -> None:
        """Record a key the operator accepted in the keeper's known_hosts; a changed key is always refused."""
        from rbee_fleet.deploy.ssh_transport import trust

        try:
            trusted = trust(self.ctx.host_keys(), key)
        except DeployError as exc:
            self.changes.audit.record("host-key accept", [key.alias], "failed", exc.reason)
            raise OperationFailed(f"{key.alias}: {exc.reason}") from None
        if trusted:
            self.changes.audit.record("host-key accept", [key.alias], "ok", f"{key.key_type} {key.fingerprint}")

    def forget_host_key(self, alias: str) -> tuple[Path, int]:
        """Remove ``alias``'s entries from the keeper's own known_hosts (the file, how many lines went).
        Keys in the user's ``~/.ssh/known_hosts`` are left alone: ``ssh-keygen -R`` is for those."""
        target = self._ssh_target(alias, "the keeper keeps no host key for it")
        store = self.ctx.host_keys()
        removed = store.forget(target.host, target.port)
        pattern = known_hosts_pattern(target.host, target.port)
        self.changes.audit.record("host-key forget", [alias], "ok",
                                  f"removed {removed} entr{'y' if removed == 1 else 'ies'} for {pattern} "
                                  f"from {store.keeper_file}")
        return store.keeper_file, removed

    def ssh_command(self, alias: str) -> list[str]:
        """The OpenSSH command line that logs the operator into ``alias`` (the TUI's shell action)."""
        return ssh_command(self.ctx, alias)

    # -- what the queen cannot tell ----------------------------------------------------------------

    async def probe(self, alias: str) -> HostProbe:
        """An installed host's state over its transport (not installed, stopped, running) or why it cannot be reached."""
        now = time.monotonic()
        try:
            spec = self._spec(alias)
        except OperationFailed as exc:
            return HostProbe(alias, "unknown", str(exc), now)
        return await probe_host(spec, self.ctx.host_keys(), now)

    # -- logs ------------------------------------------------------------------------------------

    def follow_log(self, alias: str, lines: int = 200) -> AsyncIterator[str]:
        """The hive's log, last ``lines`` lines first, then new lines as they are written."""
        return self.host(alias).follow_log(lines)
