"""Actions on a whole host: hive lifecycle, deploy (plan first), host keys, the host's log, an ssh login.

``HostActions`` is the one interface the TUI (and later the CLI's ``hive`` and ``deploy`` commands) use.
The embedded hive on the queen's machine is handled here for real: it lives and dies with the local queen.
Remote hosts need the SSH deploy layer (issue 3); until it is on this branch their actions raise
``DeployUnavailable`` with that reason, and nothing pretends to have happened.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Protocol

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.inventory import HiveDecl
from rbee_fleet.contracts.fleet import FleetStatus, JobEvent
from rbee_fleet.keeper.fleet_service import FleetService
from rbee_fleet.keeper.queen_client import QueenUnreachable
from rbee_fleet.keeper.services import EventSink, KeeperContext, ensure_workers, start_queen, stop_queen

LOG_POLL_S = 0.5


class HiveAction(str, Enum):
    INSTALL = "install"
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    UPGRADE = "upgrade"
    UNINSTALL = "uninstall"

    @property
    def destructive(self) -> bool:
        """Interrupts serving or removes files: the operator confirms first."""
        return self in (HiveAction.STOP, HiveAction.RESTART, HiveAction.UNINSTALL)


class DeployUnavailable(OperationFailed):
    """The action needs the SSH deploy layer, which this build does not have yet."""

    def __init__(self, what: str, alias: str) -> None:
        super().__init__(f"{what} on {alias} needs the SSH deploy layer (issue 3), which is not in this build yet")


@dataclass(frozen=True)
class PlanStep:
    alias: str
    what: str  # the thing checked: "queen", a worker id, "hive"
    status: Literal["ok", "change", "unavailable"]
    detail: str


@dataclass(frozen=True)
class DeployOutcome:
    alias: str
    ok: bool
    changed: bool
    error: str | None = None


@dataclass(frozen=True)
class HostKey:
    alias: str
    host: str
    port: int
    key_type: str
    fingerprint: str  # SHA256:…
    known: bool  # already trusted (in known_hosts)


class HostActions(Protocol):
    async def hive(self, alias: str, action: HiveAction, sink: EventSink | None = None) -> dict[str, Any]: ...

    async def plan(self, aliases: list[str]) -> list[PlanStep]: ...

    async def deploy(self, aliases: list[str], sink: EventSink | None = None) -> list[DeployOutcome]: ...

    async def host_key(self, alias: str) -> HostKey: ...

    async def accept_host_key(self, key: HostKey) -> None: ...

    def follow_log(self, alias: str, lines: int = 200) -> AsyncIterator[str]: ...


class KeeperHostActions:
    """Host actions through the keeper: the embedded hive locally, remote hosts over SSH (issue 3)."""

    def __init__(self, fleet: FleetService) -> None:
        self.fleet = fleet

    @property
    def ctx(self) -> KeeperContext:
        return self.fleet.ctx

    def _decl(self, alias: str) -> HiveDecl:
        decl = self.ctx.inventory.hives.get(alias)
        if decl is None:
            raise OperationFailed(f"no host {alias!r} in the inventory")
        return decl

    # -- hive lifecycle ----------------------------------------------------------------------------

    async def hive(self, alias: str, action: HiveAction, sink: EventSink | None = None) -> dict[str, Any]:
        if not self._decl(alias).embedded:
            raise DeployUnavailable(f"hive {action.value}", alias)
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
        """What a deploy would change on each host, changing nothing."""
        status: FleetStatus | None
        try:
            status = await self.fleet.status()
        except QueenUnreachable:
            status = None
        steps: list[PlanStep] = []
        for alias in aliases:
            if not self._decl(alias).embedded:
                steps.append(PlanStep(alias, "hive", "unavailable", str(DeployUnavailable("checking and deploying", alias))))
                continue
            steps.append(PlanStep(alias, "queen", "ok" if status else "change",
                                  f"running at {self.ctx.queen_url}" if status else f"start at {self.ctx.queen_url}"))
            ready = {w.heartbeat.worker_id for w in (status.workers if status else [])
                     if w.live and w.heartbeat.state.value in ("ready", "loading")}
            for wid, decl in self.ctx.inventory.worker_plan(alias):
                if wid in ready:
                    steps.append(PlanStep(alias, wid, "ok", f"serving {decl.model}"))
                else:
                    steps.append(PlanStep(alias, wid, "change", f"spawn {decl.model} with {decl.backend} on {decl.device}"))
        return steps

    async def deploy(self, aliases: list[str], sink: EventSink | None = None) -> list[DeployOutcome]:
        """Bring each host to the inventory's state; one failing host never stops the others."""

        async def one(alias: str) -> DeployOutcome:
            try:
                if not self._decl(alias).embedded:
                    raise DeployUnavailable("deploying", alias)
                result = await self._start_local(alias, sink)
                return DeployOutcome(alias, ok=True, changed=bool(result.get("changed")))
            except (OperationFailed, QueenUnreachable) as exc:
                _say(sink, alias, f"failed: {exc}", error=True)
                return DeployOutcome(alias, ok=False, changed=False, error=str(exc))

        return list(await asyncio.gather(*(one(a) for a in aliases)))

    # -- host keys -------------------------------------------------------------------------------

    async def host_key(self, alias: str) -> HostKey:
        if self._decl(alias).embedded:
            raise OperationFailed(f"{alias} is the queen's own machine: the keeper does not reach it over SSH")
        raise DeployUnavailable("reading the host key", alias)

    async def accept_host_key(self, key: HostKey) -> None:
        raise DeployUnavailable("trusting a host key", key.alias)

    # -- logs ------------------------------------------------------------------------------------

    def follow_log(self, alias: str, lines: int = 200) -> AsyncIterator[str]:
        """The hive's log, last ``lines`` lines first, then new lines as they are written."""
        if not self._decl(alias).embedded:
            raise DeployUnavailable("following the hive log", alias)
        return follow_file(self.ctx.daemon().logfile, lines)


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


def ssh_command(ctx: KeeperContext, alias: str) -> list[str]:
    """The OpenSSH command line that logs the operator into ``alias`` (for the TUI's shell action)."""
    decl = ctx.inventory.hives.get(alias)
    if decl is None:
        raise OperationFailed(f"no host {alias!r} in the inventory")
    d = ctx.inventory.defaults
    host = decl.ssh_host or decl.address
    user = decl.ssh_user or d.ssh_user
    port = decl.ssh_port or d.ssh_port
    identity = decl.identity_file or d.identity_file
    cmd = ["ssh"]
    if port != 22:
        cmd += ["-p", str(port)]
    if identity:
        cmd += ["-i", str(Path(identity).expanduser())]
    if decl.proxy_jump:
        cmd += ["-J", decl.proxy_jump]
    cmd.append(f"{user}@{host}" if user else host)
    return cmd
