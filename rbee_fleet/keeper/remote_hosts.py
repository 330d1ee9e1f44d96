"""Remote hosts over SSH, for both front ends: the CLI's ``deploy`` and ``hive …`` commands and the TUI's
host actions call these functions, so an action on a remote host means the same thing in both.

Each function does the work and reports through return values and ``DeployError`` (one line naming the
host and the cause); printing, tables and notifications are the front ends' business.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rbee_fleet.common.errors import ApiError, OperationFailed
from rbee_fleet.common.inventory import InventoryError
from rbee_fleet.common.secrets import load_or_create
from rbee_fleet.deploy import steps
from rbee_fleet.deploy.errors import (
    AuthFailed,
    CommandFailed,
    ConnectFailed,
    DeployError,
    HostKeyChanged,
    HostKeyUnknown,
)
from rbee_fleet.deploy.facts import HostFacts
from rbee_fleet.deploy.hosts import host_spec, select, ssh_target
from rbee_fleet.deploy.plan import HostSpec
from rbee_fleet.deploy.runner import EnsureWorkers, HostResult, RunContext, deploy_host, open_host, run_hosts
from rbee_fleet.deploy.transport import HostKeyStore, SSHTarget, connect
from rbee_fleet.deploy.wheelhouse import Release, WheelhouseBuilder
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.queen_client import QueenClient, QueenUnreachable
from rbee_fleet.keeper.queen_service import EventSink, run_job

HiveControl = Literal["start", "stop", "restart", "uninstall"]
PROBE_GRACE_S = 20.0  # what a probe may take beyond the connect timeout (the facts script, closing)


def host_keys(ctx: KeeperContext) -> HostKeyStore:
    """The user's known hosts plus the keeper-owned ``$RBEE_HOME/known_hosts``."""
    return HostKeyStore(ctx.layout.home / "known_hosts")


def run_context(ctx: KeeperContext, *, source: Path | None = None, accept_new: bool = False,
                check: bool = False) -> RunContext:
    """What a run over SSH needs: the release to ship, the wheelhouse builder, host keys, the cluster token."""
    release = Release.from_source(source)
    ctx.layout.ensure()
    return RunContext(
        release=release,
        builder=WheelhouseBuilder(release),
        keys=host_keys(ctx),
        token=load_or_create(ctx.layout.secrets / "cluster.token"),
        accept_new=accept_new,
        check=check,
    )


def remote_specs(ctx: KeeperContext, limit: str | None) -> list[HostSpec]:
    """The remote hives to act on: all, or those of ``limit`` (``a,b``). A bad alias or jump host is an
    ``InventoryError``."""
    path = ctx.inventory_path or "<built-in inventory>"
    aliases = select(ctx.inventory, limit, path)
    try:
        return [host_spec(ctx.inventory, alias) for alias in aliases]
    except ValueError as exc:
        raise InventoryError(path, None, "proxy_jump", str(exc)) from None


def workers_via_queen(client: QueenClient, sink: EventSink | None = None) -> EnsureWorkers:
    """Spawns a host's declared workers as jobs on the queen (their events go to ``sink``)."""

    async def ensure(spec: HostSpec) -> int:
        async def one(op: Any) -> bool:
            try:
                result = await run_job(client, op, op.worker_id or spec.alias, sink)
            except (OperationFailed, ApiError) as exc:
                message = str(exc).splitlines()[0]
                prefix = "" if message.startswith(f"worker {op.worker_id}") else f"worker {op.worker_id}: "
                raise DeployError(spec.alias, prefix + message) from None
            except QueenUnreachable as exc:
                raise DeployError(spec.alias, str(exc)) from None
            return bool(result.get("changed"))

        return sum(await asyncio.gather(*(one(op) for op in spec.workers)))

    return ensure


async def install_hosts(specs: list[HostSpec], run: RunContext, *, upgrade: bool = False,
                        results: list[HostResult] | None = None) -> list[HostResult]:
    """``hive install`` (or ``upgrade``, which needs an installed hive): a deploy of these hosts, one at a time."""
    return await run_hosts(specs, lambda s, r: deploy_host(s, run, r, require_installed=upgrade), 1, run, results)


@dataclass(frozen=True)
class HiveOutcome:
    alias: str
    changed: bool
    message: str


def not_installed(spec: HostSpec, facts: HostFacts) -> DeployError:
    return DeployError(spec.alias, f"rbee-fleet is not installed under {facts.install_dir}; install it first "
                                   f"(rbee-keeper hive install {spec.alias}, or the TUI's host menu)")


async def control_hive(spec: HostSpec, run: RunContext, action: HiveControl) -> HiveOutcome:
    """Start, stop, restart or uninstall one remote hive; raises ``DeployError`` with the reason."""
    t, facts = await open_host(spec, run)
    try:
        if action == "uninstall":
            run.update(spec.alias, "stopping the hive and removing every file of ours")
            removed = await steps.uninstall(t, spec, facts)
            return HiveOutcome(spec.alias, removed, "uninstalled: no process, service or file of ours is left"
                               if removed else "nothing of ours was installed there")
        if not facts.versions:
            raise not_installed(spec, facts)
        if action in ("stop", "restart"):
            run.update(spec.alias, "stopping the hive")
            stopped = await steps.ctl(t, facts, "stop")
            if not stopped.ok:
                raise CommandFailed(spec.alias, f"stopping the hive failed: {stopped.tail(4) or 'no output'}")
        if action in ("start", "restart"):
            run.update(spec.alias, "starting the hive")
            await steps.start(t, facts, restart=False)
            run.update(spec.alias, f"waiting for the hive to answer at {spec.url}")
            await steps.wait_hive(t, spec, facts, run.token)
        if action == "stop":
            return HiveOutcome(spec.alias, facts.hive_running,
                               "hive stopped" if facts.hive_running else "the hive was not running")
        if action == "start":
            return HiveOutcome(spec.alias, not facts.hive_running,
                               "hive running" if not facts.hive_running else "hive already running")
        return HiveOutcome(spec.alias, True, "hive restarted")
    finally:
        await t.close()


async def hive_status(spec: HostSpec, run: RunContext) -> dict[str, Any]:
    """The host, what is installed, whether the hive runs and whether it answers (``answering``)."""
    t, facts = await open_host(spec, run)
    try:
        if not facts.versions:
            raise not_installed(spec, facts)
        answering = False
        if facts.hive_running:
            try:
                await steps.wait_hive(t, spec, facts, run.token, timeout=3)
                answering = True
            except DeployError:
                answering = False
        return {
            "host": spec.alias, "ssh": spec.ssh.describe(), "url": spec.url, "facts": facts.summary(),
            "install_dir": facts.install_dir, "installed": (facts.marker or {}).get("release"),
            "current": facts.current, "versions": list(facts.versions),
            "supervision": (facts.marker or {}).get("mode"), "running_pid": facts.hive_pid, "answering": answering,
        }
    finally:
        await t.close()


async def stream_log(spec: HostSpec, run: RunContext, lines: int, follow: bool, on_line: Callable[[str], None]) -> int:
    """The hive's log, last ``lines`` lines, then (``follow``) new ones until cancelled; the exit status of
    ``tail`` (1 when there is no log yet)."""
    t, facts = await open_host(spec, run)
    try:
        return await steps.logs(t, facts, lines, follow, on_line)
    finally:
        await asyncio.shield(t.close())


def ssh_command(ctx: KeeperContext, alias: str) -> list[str]:
    """The OpenSSH command line that logs the operator into ``alias`` (for the TUI's shell action).

    Built from the same SSH target as deploys, with the inventory's port, key and the keeper's trusted host
    keys. Behind a ``proxy_jump`` each hop is reached through a ``ProxyCommand`` carrying that hop's own port,
    key and known hosts (``ssh -J`` would log into a jump host with the user's ssh config alone); a jump
    host that is not a hive (a ``~/.ssh/config`` Host, ``user@host[:port]``) is passed as it is.
    """
    if alias not in ctx.inventory.hives:
        raise OperationFailed(f"no host {alias!r} in the inventory")
    try:
        target = ssh_target(ctx.inventory, alias)
    except ValueError as exc:
        raise OperationFailed(f"{alias}: {exc}") from None
    keys = host_keys(ctx)
    files = [str(p) for p in (*keys.user_files, keys.keeper_file)]
    known = "UserKnownHostsFile=" + " ".join(f'"{p}"' if " " in p else p for p in files)
    return ["ssh", *_ssh_options(target, known), _ssh_destination(target)]


def _ssh_options(t: SSHTarget, known: str) -> list[str]:
    opts: list[str] = []
    if t.port not in (None, 22):
        opts += ["-p", str(t.port)]
    if t.identity_file:
        opts += ["-i", str(Path(t.identity_file).expanduser()), "-o", "IdentitiesOnly=yes"]
    opts += ["-o", known]
    if t.jump is not None:
        opts += ["-o", "ProxyCommand=" + _proxy_command(t.jump, known)]
    return opts


def _proxy_command(hop: SSHTarget, known: str) -> str:
    """The command ssh runs to reach its next host through ``hop``; ``%h:%p`` is that next host.

    ssh expands ``%`` tokens in a ProxyCommand, so everything but that one token is escaped (``%%``),
    which also keeps a nested hop's tokens for the ssh that runs it.
    """
    args = [a.replace("%", "%%") for a in ("ssh", *_ssh_options(hop, known))]
    return shlex.join([*args, "-W", "%h:%p", _ssh_destination(hop).replace("%", "%%")])


def _ssh_destination(t: SSHTarget) -> str:
    return f"{t.user}@{t.host}" if t.user else t.host


# -- what a host is, when the queen does not know ----------------------------------------------------

ProbeState = Literal["not installed", "stopped", "running", "unreachable", "unknown"]


@dataclass(frozen=True)
class HostProbe:
    """A host's state as seen over SSH (installed? hive running?), or why it could not be seen."""

    alias: str
    state: ProbeState
    reason: str
    at: float  # when it was probed (time.monotonic)
    version: str | None = None  # the version ``current`` points to


def probe_result(spec: HostSpec, facts: HostFacts, at: float) -> HostProbe:
    if not facts.versions:
        return HostProbe(spec.alias, "not installed", f"no rbee-fleet under {facts.install_dir}", at)
    version = facts.current
    if facts.hive_running:
        return HostProbe(spec.alias, "running", f"the hive runs (pid {facts.hive_pid}, {version})", at, version)
    return HostProbe(spec.alias, "stopped", f"{version or 'rbee-fleet'} is installed; the hive is not running", at, version)


async def probe_host(spec: HostSpec, keys: HostKeyStore, at: float) -> HostProbe:
    """Connect (never trusting a new key), read the host's facts, close; bounded by the connect timeout plus
    ``PROBE_GRACE_S``. Never raises for a host that cannot be probed: the probe says why."""

    async def probe() -> HostProbe:
        t = await connect(spec.ssh, keys)
        try:
            return probe_result(spec, await steps.gather_facts(t, spec), at)
        finally:
            await asyncio.shield(t.close())

    try:
        return await asyncio.wait_for(probe(), spec.ssh.connect_timeout_s + PROBE_GRACE_S)
    except asyncio.TimeoutError:
        return HostProbe(spec.alias, "unreachable", f"no answer over SSH within {spec.ssh.connect_timeout_s + PROBE_GRACE_S:g} s", at)
    except (HostKeyUnknown, HostKeyChanged, AuthFailed) as exc:
        return HostProbe(spec.alias, "unknown", exc.reason, at)
    except ConnectFailed as exc:
        return HostProbe(spec.alias, "unreachable", exc.reason, at)
    except DeployError as exc:
        return HostProbe(spec.alias, "unknown", exc.reason, at)
