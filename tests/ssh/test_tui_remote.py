"""The keeper TUI driving a real remote host: a Debian container running OpenSSH on 127.0.0.9 (tests/ssh),
a real queen, the TUI in-process under Pilot.

One host's life from the TUI: its unknown key shown and trusted, installed (the host turns up), its log
followed, stopped (the probe says stopped), the deploy plan checked over SSH, uninstalled (not installed).
It reuses the session's host image and wheelhouse; only its own container is started.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from textual.widgets import DataTable, OptionList

from rbee_fleet.deploy.wheelhouse import Payload
from rbee_fleet.keeper.ssh_login import ssh_command
from rbee_fleet.tui.app import KeeperApp
from rbee_fleet.tui.host_rows import HostState
from rbee_fleet.tui.screens.confirm import ConfirmScreen
from rbee_fleet.tui.screens.hive_actions import HiveActionsScreen
from rbee_fleet.tui.screens.host_key import HostKeyScreen
from rbee_fleet.tui.screens.jobs import JobsScreen
from rbee_fleet.tui.screens.plan import PlanScreen
from rbee_fleet.tui.widgets.job_log import JobLog
from tests.ssh.conftest import HostPool
from tests.ssh.hosts import TestHost
from tests.ssh.support import CACHE_DIR, Keys, write_fleet_inventory
from tests.support import procs
from tests.tui.conftest import notifications, wait_for

pytestmark = [pytest.mark.ssh, pytest.mark.slow, pytest.mark.timeout(900)]

ALIAS, ADDRESS = "t9", "127.0.0.9"
INSTALL = "/home/rbee/.local/share/rbee-fleet"


@dataclass
class RemoteFleet:
    host: TestHost
    inventory: Path
    home: Path
    queen: procs.Proc


@pytest.fixture
def remote_fleet(host_pool: HostPool, ssh_keys: Keys, offline_wheelhouse: Payload, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[RemoteFleet]:
    host = host_pool.start("tui", ADDRESS)
    port = procs.free_port()
    inventory = write_fleet_inventory(tmp_path / "fleet.toml", port, {ALIAS: {"address": ADDRESS}}, ssh_keys)
    home = tmp_path / "operator-home"
    monkeypatch.setenv("RBEE_HOME", str(home))  # the keeper in this process shares the queen's token
    monkeypatch.setenv("RBEE_CACHE_DIR", str(CACHE_DIR))  # where the session's wheelhouse was built
    queen = procs.start_queen(tmp_path, inventory, home, port)
    try:
        yield RemoteFleet(host, inventory, home, queen)
    finally:
        queen.stop()


async def menu(pilot, action: str) -> None:
    """Open the host menu of the selected host (the only one) and pick ``action``."""
    await pilot.press("a")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, HiveActionsScreen), what="the host menu")
    options = pilot.app.screen.query_one(OptionList)
    options.highlighted = options.get_option_index(action)
    await pilot.press("enter")


def state(app: KeeperApp) -> HostState | None:
    row = app.snapshot.row(ALIAS)
    return row.state if row else None


def reason(app: KeeperApp) -> str:
    row = app.snapshot.row(ALIAS)
    return row.reason if row else ""


async def finished(pilot, op_id: int, timeout: float) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.operations.get(op_id) and not app.operations.get(op_id).running,
                   timeout=timeout, what=f"operation {op_id} to end")
    op = app.operations.get(op_id)
    assert op.state == "succeeded", (op.error, [e.message for e in op.events])


async def test_one_remote_hosts_life_from_the_tui(remote_fleet: RemoteFleet) -> None:
    host = remote_fleet.host
    out = host.exec("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub", user="root").stdout
    real_fingerprint = re.search(r"SHA256:\S+", out).group(0)  # type: ignore[union-attr]
    known_hosts = remote_fleet.home / "known_hosts"
    app = KeeperApp(str(remote_fleet.inventory), refresh_s=0.5)
    async with app.run_test(size=(120, 36)) as pilot:
        # The queen has never heard of the host: an SSH probe says why its state is unknown.
        await wait_for(pilot, lambda: "unknown host key" in reason(app), timeout=30, what="the probe's reason")
        assert state(app) is HostState.UNKNOWN and real_fingerprint in reason(app)

        # Its key, shown before anything is trusted, is the one the host really has.
        await menu(pilot, "host_key")
        await wait_for(pilot, lambda: isinstance(app.screen, HostKeyScreen), timeout=30, what="the host key")
        assert app.screen.key.fingerprint == real_fingerprint and app.screen.key.state == "unknown"
        assert not known_hosts.exists()
        await pilot.click("#accept")
        await wait_for(pilot, lambda: state(app) is HostState.NOT_INSTALLED, timeout=30, what="not installed")
        assert known_hosts.read_text().startswith(f"{ADDRESS} ssh-ed25519 ")
        # The shell action's OpenSSH command line gets in with the key the keeper recorded (and no other).
        cmd = ssh_command(app.fleet.ctx, ALIAS)
        cmd[1:1] = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
        login = await asyncio.to_thread(subprocess.run, [*cmd, "echo", "logged-in-as-$(id -un)"],
                                        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert login.stdout.strip() == "logged-in-as-rbee", login.stderr

        # Install: the wheelhouse goes over, the hive starts, the queen spawns the declared worker: up.
        await menu(pilot, "install")
        await wait_for(pilot, lambda: state(app) is HostState.INSTALLING, timeout=10, what="installing")
        await finished(pilot, 1, timeout=420)
        install = [e.message for e in app.operations.get(1).events]
        assert any(m.startswith("uploading ") for m in install) and any("installing 0.1.0-" in m for m in install)
        await wait_for(pilot, lambda: state(app) is HostState.UP, timeout=120, what="the host up")
        assert app.snapshot.row(ALIAS).version and app.snapshot.row(ALIAS).running == 1

        # Its log, followed over SSH on the Jobs screen.
        await menu(pilot, "log")
        await wait_for(pilot, lambda: isinstance(app.screen, JobsScreen), what="the jobs screen")
        log = app.screen.query_one("#host-log", JobLog)
        await wait_for(pilot, lambda: any("rbee_fleet" in line.text for line in log.lines), timeout=30,
                       what="the remote hive's log")
        host.exec(f"echo marker-from-the-test >> {INSTALL}/logs/hive.log")
        await wait_for(pilot, lambda: any("marker-from-the-test" in line.text for line in log.lines), timeout=30,
                       what="a new line of the remote log")
        await pilot.press("f1")

        # Stop (after a confirmation): the queen loses its heartbeat, the probe says stopped.
        await menu(pilot, "stop")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        await pilot.press("y")
        await finished(pilot, 2, timeout=120)
        # The row says STOPPED while the stop runs too: wait for the probe's own reason, not the busy marker.
        await wait_for(pilot, lambda: state(app) is HostState.STOPPED and "the hive is not running" in reason(app),
                       timeout=60, what="the host stopped, as the probe says")
        assert "running" not in host.exec(f"{INSTALL}/bin/rbee-hive-ctl status").stdout

        # The deploy plan, checked over SSH, would start it again; cancelled, nothing changes.
        await pilot.press("D")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen)
                       and app.screen.query_one("#plan", DataTable).row_count > 0, timeout=60, what="the plan")
        rows = [[str(c) for c in app.screen.query_one("#plan", DataTable).get_row_at(i)]
                for i in range(app.screen.query_one("#plan", DataTable).row_count)]
        assert [ALIAS, "start", "change", "start the hive (pidfile)"] in rows, rows
        assert [ALIAS, "install", "change"] not in [r[:3] for r in rows]  # installed already
        await pilot.press("n")
        await wait_for(pilot, lambda: not isinstance(app.screen, PlanScreen), what="the plan to close")
        assert len(app.operations) == 2

        # Uninstall: nothing of ours is left, and the host shows as not installed.
        await menu(pilot, "uninstall")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        await pilot.press("y")
        await finished(pilot, 3, timeout=120)
        await wait_for(pilot, lambda: state(app) is HostState.NOT_INSTALLED, timeout=60, what="not installed")
        assert host.exec(f"test -e {INSTALL}").returncode == 1
        assert not [n for n in notifications(app) if "failed" in n]
