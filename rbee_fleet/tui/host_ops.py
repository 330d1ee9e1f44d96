"""The TUI's actions on whole hosts: the host menu, hive lifecycle, deploys (plan first), host keys, logs,
ssh, and the SSH probes that tell a remote host's state when the queen cannot.

A mixin of ``KeeperApp``: everything here goes through ``HostService`` (the keeper's service layer) in
background workers, so SSH never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from textual import work

from rbee_fleet.common.errors import ApiError, OperationFailed
from rbee_fleet.common.inventory import Inventory
from rbee_fleet.contracts.fleet import FleetStatus
from rbee_fleet.contracts.vocabulary import HiveAction
from rbee_fleet.keeper.hosts.probe import HostProbe
from rbee_fleet.keeper.hosts.service import PARALLEL, HostService
from rbee_fleet.keeper.queen_client import QueenUnreachable
from rbee_fleet.keeper.queen_service import EventSink
from rbee_fleet.tui.host_rows import host_rows, needs_probe
from rbee_fleet.tui.screens.confirm import ConfirmScreen
from rbee_fleet.tui.screens.hive_actions import HiveActionsScreen
from rbee_fleet.tui.screens.host_key import HostKeyScreen
from rbee_fleet.tui.screens.jobs import JobsScreen
from rbee_fleet.tui.screens.plan import PlanScreen

if TYPE_CHECKING:
    from rbee_fleet.tui.app import KeeperApp

PROBE_TTL_S = 30.0  # a host's probe is reused this long: no SSH connection per refresh


@dataclass
class ProbeCache:
    """The latest SSH probe of each remote host the queen has no live hive of, and the probes under way."""

    ttl_s: float = PROBE_TTL_S
    results: dict[str, HostProbe] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    forgotten: int = 0  # how many times probes were dropped: a probe started before a drop is stale
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(PARALLEL))

    def due(self, inventory: Inventory, status: FleetStatus | None, busy: Mapping[str, str], now: float) -> list[str]:
        """Hosts to probe now: only SSH can tell their state, and their last probe is missing or old."""
        hives = {h.hive_id: h for h in status.hives} if status else {}
        due = []
        for alias, decl in inventory.hives.items():
            if not needs_probe(decl, hives.get(alias)) or alias in self.running or alias in busy:
                continue
            last = self.results.get(alias)
            if last is None or now - last.at >= self.ttl_s:
                due.append(alias)
        return due

    def forget(self, alias: str | None = None) -> None:
        """Drop a host's probe (all with no alias): it is probed again at the next refresh that needs it."""
        self.forgotten += 1
        if alias is None:
            self.results.clear()
        else:
            self.results.pop(alias, None)


class HostOpsMixin:
    """Host actions of the keeper's TUI (mixed into ``KeeperApp``)."""

    # -- SSH probes for the Fleet screen ------------------------------------------------------------

    def probe_due_hosts(self: KeeperApp) -> None:
        if self.fleet is None or self.hosts is None:
            return
        busy = self.operations.busy_hosts()
        for alias in self.probes.due(self.fleet.ctx.inventory, self.snapshot.status, busy, time.monotonic()):
            self.probes.running.add(alias)
            self._probe(self.hosts, alias)

    @work(group="probes", exit_on_error=False)
    async def _probe(self: KeeperApp, hosts: HostService, alias: str) -> None:
        epoch = self.probes.forgotten
        try:
            async with self.probes.slots:
                probe = await hosts.probe(alias)
        except Exception as exc:  # noqa: BLE001 - a probe never takes the TUI down
            probe = HostProbe(alias, "unknown", f"the probe failed: {type(exc).__name__}: {exc}", time.monotonic())
        finally:
            self.probes.running.discard(alias)
        if epoch == self.probes.forgotten:  # nothing happened since that makes it stale
            self.probes.results[alias] = probe
            self.redraw_rows()
        else:
            self.poll()  # probe again

    def redraw_rows(self: KeeperApp) -> None:
        """The host rows again from the last status, with what probes and operations say now."""
        if self.fleet is None:
            return
        rows = host_rows(self.fleet.ctx.inventory, self.snapshot.status, self.operations.busy_hosts(),
                         self.probes.results)
        self.snapshot = replace(self.snapshot, rows=tuple(rows))

    # -- the host menu and hive lifecycle -------------------------------------------------------------

    @work(group="dialogs")
    async def host_menu(self: KeeperApp, alias: str) -> None:
        row = self.snapshot.row(alias)
        note = f"{row.address}: {row.state.value}, {row.reason}" if row else ""
        choice = await self.push_screen_wait(HiveActionsScreen(alias, note))
        if choice is None:
            return
        if choice in {a.value for a in HiveAction}:
            self.hive_action(alias, HiveAction(choice))
        elif choice == "deploy":
            self.deploy([alias])
        elif choice == "host_key":
            self.check_host_key(alias)
        elif choice == "log":
            self.follow_host_log(alias)
        elif choice == "ssh":
            self.ssh(alias)

    @work(group="dialogs")
    async def hive_action(self: KeeperApp, alias: str, action: HiveAction) -> None:
        if (found := self._require_inventory()) is None:
            return
        _, hosts = found
        if action.destructive and not await self.push_screen_wait(ConfirmScreen(
                f"{action.value.capitalize()} the hive on {alias}?", yes=action.value.capitalize(),
                detail="Its workers stop serving until it is started again." if action is not HiveAction.UNINSTALL
                else "Its workers stop, and its service and every file of ours are removed from the host.")):
            return
        self.start_operation(f"{action.value} hive on {alias}", f"hive_{action.value}", alias,
                             lambda sink: hosts.hive(alias, action, sink))

    # -- deploys ---------------------------------------------------------------------------------

    @work(group="dialogs")
    async def deploy(self: KeeperApp, aliases: list[str] | None = None) -> None:
        """Check first (remote hosts over SSH), show the plan, and deploy each host as its own operation when
        the operator agrees."""
        if (found := self._require_inventory()) is None:
            return
        fleet, hosts = found
        targets = aliases or list(fleet.ctx.inventory.hives)
        installed = [a for a in targets if not fleet.ctx.inventory.hives[a].embedded]
        if installed:
            self.notify(f"checking {', '.join(installed)}…", timeout=3)
        try:
            steps = await hosts.plan(targets)
        except (OperationFailed, QueenUnreachable, ApiError) as exc:
            self.notify(f"cannot plan the deploy: {exc}", severity="error", timeout=12)
            return
        if not await self.push_screen_wait(PlanScreen(steps)):
            return
        failed = {s.alias for s in steps if s.status == "failed"}
        for alias in targets:
            if alias not in failed:
                self.start_operation(f"deploy {alias}", "deploy", alias, partial(_deploy_one, hosts, alias))

    # -- host keys, logs, a shell ------------------------------------------------------------------

    @work(group="dialogs")
    async def check_host_key(self: KeeperApp, alias: str) -> None:
        if (found := self._require_inventory()) is None:
            return
        _, hosts = found
        try:
            key = await hosts.host_key(alias)
        except (OperationFailed, OSError) as exc:
            self.notify(f"host key of {alias}: {exc}", severity="error", timeout=12)
            return
        if not await self.push_screen_wait(HostKeyScreen(key, alias)):
            return
        try:
            await hosts.accept_host_key(key)
        except (OperationFailed, OSError) as exc:
            self.notify(f"could not trust the key of {key.alias}: {exc}", severity="error", timeout=12)
            return
        self.notify(f"trusted {key.fingerprint} for {key.alias}")
        self.probes.forget()  # hosts behind this key can be probed now
        self.poll()

    @work(group="navigation")
    async def follow_host_log(self: KeeperApp, alias: str) -> None:
        await self.switch_mode("jobs")
        screen = self.screen
        if isinstance(screen, JobsScreen):
            screen.show_host_log(alias)

    def ssh(self: KeeperApp, alias: str) -> None:
        """Hand the terminal to an interactive ssh session on ``alias``; the TUI comes back when it ends."""
        if self.hosts is None:
            return
        try:
            cmd = self.hosts.ssh_command(alias)
        except OperationFailed as exc:
            self.notify(str(exc), severity="error")
            return
        if shutil.which(cmd[0]) is None:
            self.notify("no ssh client on this machine", severity="error")
            return
        try:
            with self.suspend():
                code = subprocess.call(cmd)
        except Exception as exc:  # noqa: BLE001 - SuspendNotSupported (tests, web) and friends
            self.notify(f"cannot open a shell here: {type(exc).__name__} {exc}".strip(), severity="error")
            return
        if code not in (0, 130):
            self.notify(f"ssh {alias} exited with {code}", severity="warning")


async def _deploy_one(hosts: HostService, alias: str, sink: EventSink) -> dict[str, Any]:
    (result,) = await hosts.deploy([alias], sink)
    if not result.ok:
        raise OperationFailed(result.error or "failed")
    return {"changed": result.changed}
