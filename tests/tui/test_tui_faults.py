"""The TUI stays up and says what is wrong: no queen, a host that stops answering, a bad inventory.

Real processes throughout: a queen the TUI itself starts and stops, a standalone hive process that is
killed, inventory files on disk.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from textual.widgets import OptionList, Static

from rbee_fleet.common.paths import Layout
from rbee_fleet.keeper.local_queen import QueenDaemon
from rbee_fleet.tui.app import KeeperApp
from rbee_fleet.tui.host_rows import HostState
from rbee_fleet.tui.screens.confirm import ConfirmScreen
from rbee_fleet.tui.screens.hive_actions import HiveActionsScreen
from rbee_fleet.tui.screens.inventory import InventoryScreen
from rbee_fleet.tui.screens.jobs import JobsScreen
from rbee_fleet.tui.widgets.job_log import JobLog
from tests.support import procs
from tests.tui.conftest import notifications, wait_for

pytestmark = pytest.mark.slow

SIZE = (100, 30)


def header(app: KeeperApp) -> str:
    return str(app.screen.query_one("#queen", Static).content)


async def choose(pilot, action: str) -> None:
    """Pick ``action`` in the host action menu."""
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, HiveActionsScreen), what="the host menu")
    options = pilot.app.screen.query_one(OptionList)
    options.highlighted = options.get_option_index(action)
    await pilot.press("enter")


@pytest.fixture
def own_queen(tmp_path: Path):
    """An inventory whose queen nobody runs yet; whatever queen the TUI starts is stopped afterwards."""
    port = procs.free_port()
    inventory = procs.write_inventory(tmp_path / "fleet.toml", port=port, worker_port_base=procs.free_port_range(4),
                                      workers=[])
    yield inventory, port
    QueenDaemon(Layout.default(), str(inventory)).stop(timeout=20)


async def test_no_queen_then_start_and_stop_the_local_fleet_from_the_tui(own_queen):
    inventory, port = own_queen
    app = KeeperApp(str(inventory), refresh_s=0.5)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.snapshot.polled, what="the first poll")
        assert "not answering" in header(app) and "connection refused" in header(app)
        assert app.snapshot.row("localhost").state is HostState.STOPPED
        for key in ("f2", "f3", "f4", "f1"):  # every screen opens with no queen
            await pilot.press(key)
            await pilot.pause(0.2)
        assert app.is_running

        await pilot.press("a")
        await choose(pilot, "start")
        await wait_for(pilot, lambda: app.snapshot.status is not None, timeout=60, what="the queen the TUI started")
        await wait_for(pilot, lambda: app.snapshot.row("localhost").state is HostState.UP, what="the host up")
        assert f"127.0.0.1:{port}" in header(app) and "not answering" not in header(app)
        assert QueenDaemon(Layout.default(), str(inventory)).running_pid() is not None

        # The host's log, followed live on the Jobs screen (the local hive logs into the queen's log).
        await pilot.press("a")
        await choose(pilot, "log")
        await wait_for(pilot, lambda: isinstance(app.screen, JobsScreen), what="the jobs screen")
        log = app.screen.query_one("#host-log", JobLog)
        await wait_for(pilot, lambda: any("queen listening on" in line.text for line in log.lines),
                       what="the queen's log")
        await pilot.press("f1")

        await pilot.press("a")
        await choose(pilot, "stop")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: not app.operations.running(), timeout=60, what="the stop to finish")
        assert [op.state for op in app.operations] == ["succeeded", "succeeded"]
        assert QueenDaemon(Layout.default(), str(inventory)).running_pid() is None
        await wait_for(pilot, lambda: app.snapshot.status is None and app.snapshot.row("localhost").state
                       is HostState.STOPPED, what="the fleet screen to show it stopped")


async def test_a_host_that_stops_answering_is_shown_unreachable(tmp_path: Path):
    port, hive_port = procs.free_port(), procs.free_port()
    inventory = procs.write_inventory(tmp_path / "fleet.toml", port=port, worker_port_base=procs.free_port_range(4),
                                      workers=[])
    with open(inventory, "a") as fh:
        # Its SSH port is closed: the SSH probe and the remote actions fail with that reason.
        fh.write(f'\n[hives.far]\naddress = "127.0.0.1"\nport = {hive_port}\nssh_port = {procs.free_port()}\n')
    home = tmp_path / "queen-home"
    queen = procs.start_queen(tmp_path, inventory, home, port)
    hive = procs.spawn("hive", [
        sys.executable, "-m", "rbee_fleet.hive", "--hive-id", "far", "--port", str(hive_port),
        "--queen-url", queen.url, "--token-file", str(home / "secrets" / "cluster.token"),
        "--home", str(tmp_path / "far-home"), "--heartbeat-interval", "0.5",
    ], tmp_path / "hive.log", f"http://127.0.0.1:{hive_port}")
    try:
        app = KeeperApp(str(inventory), refresh_s=0.5)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.snapshot.row("far") and app.snapshot.row("far").state is HostState.UP,
                           what="the remote hive up")
            hive.stop()
            await wait_for(pilot, lambda: app.snapshot.row("far").state is HostState.UNREACHABLE, timeout=20,
                           what="the hive to be unreachable")
            assert "no heartbeat" in app.snapshot.row("far").reason
            await wait_for(pilot, lambda: "ssh: connection refused" in app.snapshot.row("far").reason,
                           what="the SSH probe's reason")
            assert app.snapshot.row("localhost").state is HostState.UP  # the others carry on
            table = app.screen.query_one("#fleet")
            table.move_cursor(row=table.get_row_index("far"))
            await wait_for(pilot, lambda: "far: unreachable" in str(app.screen.query_one("#host-reason", Static).content),
                           what="the reason line", timeout=5)

            # A remote action on it fails with the host's reason, and the TUI carries on.
            await pilot.press("a")
            await choose(pilot, "install")
            await wait_for(pilot, lambda: any("far: connection refused" in n for n in notifications(app)),
                           what="the reason the install failed")
            assert app.operations.get(1).state == "failed"
            # A shell needs a real terminal; headless, the TUI says so and stays up.
            await pilot.press("x")
            await wait_for(pilot, lambda: any("shell" in n for n in notifications(app)), what="the ssh notice")
            assert app.is_running
    finally:
        hive.stop()
        queen.stop()


async def test_a_bad_inventory_is_reported_and_the_app_stays_up(tmp_path: Path):
    path = tmp_path / "fleet.toml"
    path.write_text('[queen]\nhost = "127.0.0.1"\nprot = 8500\n')
    app = KeeperApp(str(path), refresh_s=0.5)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.snapshot.polled, what="the first snapshot")
        expected = f"{path}:3: queen.prot: unknown key (did you mean 'port'?)"
        assert app.inventory_error == expected
        notice = app.screen.query_one("#notice", Static)
        assert notice.display and expected in str(notice.content)
        assert "inventory has errors" in header(app)
        await pilot.press("f4")
        await wait_for(pilot, lambda: isinstance(app.screen, InventoryScreen), what="the inventory screen")
        check = str(app.screen.query_one("#inv-check", Static).content)
        assert "not valid yet" in check and "queen.prot" in check
        await pilot.press("f1", "w")  # actions explain instead of failing
        await wait_for(pilot, lambda: any("no inventory loaded" in n for n in notifications(app)), what="the notice")

        # Fixed on disk and reloaded: the error goes away and the fleet shows.
        procs.write_inventory(path, port=procs.free_port(), worker_port_base=9300, workers=[])
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.snapshot.row("localhost") is not None, what="the reloaded fleet")
        assert app.inventory_error is None and not app.screen.query_one("#notice", Static).display
