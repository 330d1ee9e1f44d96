"""Actions on a whole host: hive lifecycle, deploy (plan first), host keys, the host's log, an ssh login.

``HostActions`` is the interface the TUI uses. The embedded hive on the queen's machine lives and dies
with the local queen; remote hosts are reached over SSH through the same service functions as the CLI's
``deploy`` and ``hive`` commands (``keeper.remote_hosts``), so every action means the same in both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.inventory import HiveDecl
from rbee_fleet.contracts.fleet import FleetStatus, JobEvent
from rbee_fleet.contracts.vocabulary import HiveAction
from rbee_fleet.deploy.errors import DeployError, WheelhouseError
from rbee_fleet.deploy.hosts import host_spec, ssh_target
from rbee_fleet.deploy.plan import HostSpec
from rbee_fleet.deploy.runner import CANCELLED, CHANGED, FAILED, OK, HostResult, RunContext, deploy
from rbee_fleet.deploy.transport import HostKey, SSHTarget, scan_host_key
from rbee_fleet.deploy.wheelhouse import WheelhouseBuilder
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.local_queen import start_queen, stop_queen
from rbee_fleet.keeper.queen_client import QueenUnreachable
from rbee_fleet.keeper.queen_service import EventSink, QueenService, ensure_workers
from rbee_fleet.keeper.remote_hosts import (
    PROBE_GRACE_S,
    HostProbe,
    control_hive,
    host_keys,
    install_hosts,
    probe_host,
    run_context,
    stream_log,
    workers_via_queen,
)

LOG_POLL_S = 0.5
PARALLEL = 8  # remote hosts deployed or checked at a time


@dataclass(frozen=True)
class PlanStep:
    alias: str
    what: str  # the thing checked: "queen", "install", "start", a worker id, "host"
    status: Literal["ok", "change", "failed"]
    detail: str


@dataclass(frozen=True)
class DeployOutcome:
    alias: str
    ok: bool
    changed: bool
    error: str | None = None


class HostActions(Protocol):
    async def hive(self, alias: str, action: HiveAction, sink: EventSink | None = None) -> dict[str, Any]: ...

    async def plan(self, aliases: list[str]) -> list[PlanStep]: ...

    async def deploy(self, aliases: list[str], sink: EventSink | None = None) -> list[DeployOutcome]: ...

    async def host_key(self, alias: str) -> HostKey: ...

    async def accept_host_key(self, key: HostKey) -> None: ...

    async def probe(self, alias: str) -> HostProbe: ...

    def follow_log(self, alias: str, lines: int = 200) -> AsyncIterator[str]: ...


class KeeperHostActions:
    """Host actions through the keeper: the embedded hive locally, remote hosts over SSH."""

    def __init__(self, fleet: QueenService) -> None:
        self.fleet = fleet
        self._queen_lock = asyncio.Lock()
        self._builders: dict[str, WheelhouseBuilder] = {}

    @property
    def ctx(self) -> KeeperContext:
        return self.fleet.ctx

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

    def _run(self, sink: EventSink | None, *, check: bool = False) -> RunContext:
        """A run over SSH whose progress goes to ``sink``; new host keys are never trusted implicitly."""
        try:
            run = run_context(self.ctx, check=check)
        except WheelhouseError as exc:
            raise OperationFailed(str(exc)) from None
        # Hosts deployed as separate operations at once share one builder: one build per wheelhouse.
        run.builder = self._builders.setdefault(run.release.id, run.builder)
        run.update = lambda alias, message: _say(sink, alias, message)
        return run

    async def _with_queen(self, run: RunContext, sink: EventSink | None) -> None:
        """Remote hosts' workers are spawned through the local queen: start it unless it runs."""
        async with self._queen_lock:
            started, _ = await start_queen(self.ctx, self.fleet.client)
        if started:
            _say(sink, "queen", f"queen started at {self.ctx.queen_url}")
        run.ensure_workers = workers_via_queen(self.fleet.client, sink)

    # -- hive lifecycle ----------------------------------------------------------------------------

    async def hive(self, alias: str, action: HiveAction, sink: EventSink | None = None) -> dict[str, Any]:
        if self._decl(alias).embedded:
            return await self._local_hive(alias, action, sink)
        spec = self._spec(alias)
        run = self._run(sink)
        if action in (HiveAction.INSTALL, HiveAction.UPGRADE):
            await self._with_queen(run, sink)
            (result,) = await install_hosts([spec], run, upgrade=action is HiveAction.UPGRADE)
            if result.status not in (OK, CHANGED):
                raise OperationFailed(f"{alias}: {result.reason}")
            return {"changed": result.status == CHANGED, "message": result.reason, "version": result.version}
        try:
            outcome = await control_hive(spec, run, action.value)  # type: ignore[arg-type]
        except DeployError as exc:
            raise OperationFailed(f"{alias}: {exc.reason}") from None
        _say(sink, alias, outcome.message)
        return {"changed": outcome.changed, "message": outcome.message}

    async def _local_hive(self, alias: str, action: HiveAction, sink: EventSink | None) -> dict[str, Any]:
        if action in (HiveAction.INSTALL, HiveAction.UPGRADE, HiveAction.UNINSTALL):
            raise OperationFailed(f"{alias} runs the embedded hive, part of this keeper's own rbee-fleet install: "
                                  f"{action.value} applies to remote hosts")
        result: dict[str, Any] = {}
        if action in (HiveAction.STOP, HiveAction.RESTART):
            _say(sink, alias, "stopping the local queen and its workers")
            result["stopped"] = await stop_queen(self.ctx, self.fleet.client)
        if action in (HiveAction.START, HiveAction.RESTART):
            result.update(await self._start_local(alias, sink))
        return result

    async def _start_local(self, alias: str, sink: EventSink | None) -> dict[str, Any]:
        _say(sink, alias, f"starting the queen at {self.ctx.queen_url}")
        async with self._queen_lock:
            started, _ = await start_queen(self.ctx, self.fleet.client)
        _say(sink, alias, "queen started" if started else "queen already running")
        results = await ensure_workers(self.ctx, self.fleet.client, sink)
        failed = [f"{wid}: {err}" for wid, _, err in results if err]
        if failed:
            raise OperationFailed("; ".join(failed))
        changed = started or any((r or {}).get("changed") for _, r, _ in results)
        return {"started": started, "changed": changed, "workers": [wid for wid, _, _ in results]}

    # -- deploy ----------------------------------------------------------------------------------

    async def plan(self, aliases: list[str]) -> list[PlanStep]:
        """What a deploy would change on each host, changing nothing; remote hosts are checked over SSH."""
        status: FleetStatus | None
        try:
            status = await self.fleet.status()
        except QueenUnreachable:
            status = None
        remote = [a for a in aliases if not self._decl(a).embedded]
        by_host = await self.plan_remote(remote, status) if remote else {}
        steps: list[PlanStep] = []
        for alias in aliases:
            if alias in by_host:
                steps += by_host[alias]
                continue
            steps.append(PlanStep(alias, "queen", "ok" if status else "change",
                                  f"running at {self.ctx.queen_url}" if status else f"start at {self.ctx.queen_url}"))
            steps += self._worker_steps(alias, status)
        return steps

    async def plan_remote(self, aliases: list[str], status: FleetStatus | None) -> dict[str, list[PlanStep]]:
        """The deploy runner's check mode: each step of each host's plan, ok or change, or why the host fails."""
        try:
            specs = [self._spec(a) for a in aliases]
            run = self._run(None, check=True)
        except OperationFailed as exc:
            return {a: [PlanStep(a, "host", "failed", str(exc))] for a in aliases}
        by_host: dict[str, list[PlanStep]] = {}
        for r in await deploy(specs, run, PARALLEL):
            if r.plan is None or r.status in (FAILED, CANCELLED):
                by_host[r.alias] = [PlanStep(r.alias, "host", "failed", r.reason)]
                continue
            steps: list[PlanStep] = []
            for step in r.plan.steps:
                if step.action == "workers":
                    steps += self._worker_steps(r.alias, status)
                else:
                    steps.append(PlanStep(r.alias, step.action, "change" if step.changes else "ok", step.detail))
            by_host[r.alias] = steps
        return by_host

    def _worker_steps(self, alias: str, status: FleetStatus | None) -> list[PlanStep]:
        """The host's declared workers: serving already, or to be spawned through the queen."""
        ready = {w.heartbeat.worker_id for w in (status.workers if status else [])
                 if w.live and w.heartbeat.state.value in ("ready", "loading")}
        return [PlanStep(alias, wid, "ok", f"serving {decl.model}") if wid in ready
                else PlanStep(alias, wid, "change", f"spawn {decl.model} with {decl.backend} on {decl.device}")
                for wid, decl in self.ctx.inventory.worker_plan(alias)]

    async def deploy(self, aliases: list[str], sink: EventSink | None = None) -> list[DeployOutcome]:
        """Bring each host to the inventory's state; one failing host never stops the others."""

        async def local(alias: str) -> DeployOutcome:
            try:
                result = await self._start_local(alias, sink)
                return DeployOutcome(alias, ok=True, changed=bool(result.get("changed")))
            except (OperationFailed, QueenUnreachable) as exc:
                _say(sink, alias, f"failed: {exc}", error=True)
                return DeployOutcome(alias, ok=False, changed=False, error=str(exc))

        remote = [a for a in aliases if not self._decl(a).embedded]
        done = await asyncio.gather(self._deploy_remote(remote, sink),
                                    *(local(a) for a in aliases if a not in remote))
        outcomes = {o.alias: o for o in [*done[0], *done[1:]]}
        return [outcomes[a] for a in aliases]

    async def _deploy_remote(self, aliases: list[str], sink: EventSink | None) -> list[DeployOutcome]:
        if not aliases:
            return []
        try:
            specs = [self._spec(a) for a in aliases]
            run = self._run(sink)
            await self._with_queen(run, sink)
        except (OperationFailed, QueenUnreachable) as exc:
            for alias in aliases:
                _say(sink, alias, f"failed: {exc}", error=True)
            return [DeployOutcome(a, ok=False, changed=False, error=str(exc)) for a in aliases]
        return [_outcome(r, sink) for r in await deploy(specs, run, PARALLEL)]

    # -- host keys -------------------------------------------------------------------------------

    def _target(self, alias: str) -> SSHTarget:
        if self._decl(alias).embedded:
            raise OperationFailed(f"{alias} is the queen's own machine: the keeper does not reach it over SSH")
        try:
            return ssh_target(self.ctx.inventory, alias)
        except ValueError as exc:
            raise OperationFailed(f"{alias}: {exc}") from None

    async def host_key(self, alias: str) -> HostKey:
        """The key the host (or its jump host, when that one is not trusted yet) presents; records nothing."""
        target = self._target(alias)
        limit = target.connect_timeout_s + PROBE_GRACE_S
        try:
            return await asyncio.wait_for(scan_host_key(target, host_keys(self.ctx)), limit)
        except asyncio.TimeoutError:
            raise OperationFailed(f"{alias}: no answer over SSH within {limit:g} s") from None
        except DeployError as exc:
            raise OperationFailed(f"{alias}: {exc.reason}") from None

    async def accept_host_key(self, key: HostKey) -> None:
        """Record a key the operator accepted in the keeper's known_hosts; a changed key is always refused."""
        try:
            host_keys(self.ctx).trust(key)
        except DeployError as exc:
            raise OperationFailed(f"{key.alias}: {exc.reason}") from None

    # -- what the queen cannot tell ----------------------------------------------------------------

    async def probe(self, alias: str) -> HostProbe:
        """A remote host's state over SSH (not installed, stopped, running) or why it cannot be reached."""
        now = time.monotonic()
        try:
            spec = self._spec(alias)
        except OperationFailed as exc:
            return HostProbe(alias, "unknown", str(exc), now)
        return await probe_host(spec, host_keys(self.ctx), now)

    # -- logs ------------------------------------------------------------------------------------

    def follow_log(self, alias: str, lines: int = 200) -> AsyncIterator[str]:
        """The hive's log, last ``lines`` lines first, then new lines as they are written."""
        if self._decl(alias).embedded:
            return follow_file(self.ctx.daemon().logfile, lines)
        return self._follow_remote(self._spec(alias), lines)

    async def _follow_remote(self, spec: HostSpec, lines: int) -> AsyncIterator[str]:
        """``hive logs -f`` as an iterator: the SSH connection lives as long as the iteration."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        tail = asyncio.ensure_future(stream_log(spec, self._run(None), lines, True, queue.put_nowait))
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
                    raise OperationFailed(f"{spec.alias}: {exc.reason}") from None
                yield f"(the log ended: tail exited with {code})"
                return
        finally:
            for task in (getter, tail):
                if task is not None:
                    task.cancel()
            await asyncio.gather(tail, return_exceptions=True)


def _outcome(result: HostResult, sink: EventSink | None) -> DeployOutcome:
    ok = result.status in (OK, CHANGED)
    if not ok:
        _say(sink, result.alias, f"failed: {result.reason}", error=True)
    return DeployOutcome(result.alias, ok=ok, changed=result.status == CHANGED, error=None if ok else result.reason)


def _say(sink: EventSink | None, label: str, message: str, error: bool = False) -> None:
    """Report a step of a host action through the same sink job events use."""
    if sink is None:
        return
    sink(label, JobEvent(job_id="", seq=0, type="error" if error else "log", message=message, ts=time.time()))


async def follow_file(path: Path, lines: int = 200, poll_s: float = LOG_POLL_S) -> AsyncIterator[str]:
    """Tail ``path`` like ``tail -n LINES -F``: survives the file being absent, truncated or replaced."""
    position = 0
    inode: int | None = None
    waiting_said = False
    first = True
    while True:
        try:
            stat = await asyncio.to_thread(path.stat)
        except FileNotFoundError:
            if not waiting_said:
                yield f"(no log at {path} yet; waiting for it)"
                waiting_said = True
            await asyncio.sleep(poll_s)
            continue
        if inode != stat.st_ino or stat.st_size < position:
            inode, position = stat.st_ino, 0
        if stat.st_size > position:
            chunk, position = await asyncio.to_thread(_read_from, path, position)
            text = chunk.decode("utf-8", errors="replace").splitlines()
            for line in text[-lines:] if first else text:
                yield line
        first = False
        await asyncio.sleep(poll_s)


def _read_from(path: Path, position: int) -> tuple[bytes, int]:
    with open(path, "rb") as fh:
        fh.seek(position)
        data = fh.read()
        # Keep a partial last line for the next read.
        cut = data.rfind(b"\n") + 1
        return data[:cut], position + cut
