"""Filtering, sorting and the command palette, on the fixed fleet of ``StandInFleetService`` (the reads
are a stand-in; the actions run the real service layer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.command import CommandPalette
from textual.widgets import Button, Label

from rbee_fleet.keeper.host_actions import HiveAction, HostKey, KeeperHostActions
from rbee_fleet.tui.app import KeeperApp
from rbee_fleet.tui.palette import keeper_commands
from rbee_fleet.tui.screens.host_key import HostKeyScreen
from rbee_fleet.tui.widgets.fleet_table import FleetTable
from tests.tui.conftest import notifications, wait_for
from tests.tui.standin import StandInFleetService, write_inventory


@pytest.fixture
def app(tmp_path: Path) -> KeeperApp:
    return KeeperApp(str(write_inventory(tmp_path / "fleet.toml")), refresh_s=3600,
                     service_factory=StandInFleetService)


def keys(table: FleetTable) -> list[str]:
    return [k.value for k in table.rows]


async def test_filter_and_sort_the_fleet(app: KeeperApp):
    async with app.run_test(size=(120, 30)) as pilot:
        table = app.screen.query_one(FleetTable)
        await wait_for(pilot, lambda: table.row_count == 3, what="the fleet")
        assert keys(table) == ["gpu-box", "localhost", "old-laptop"]
        await pilot.press("slash", *"rtx")  # devices are searched too
        await wait_for(pilot, lambda: keys(table) == ["gpu-box"], what="the filter")
        await pilot.press("escape")
        assert keys(table) == ["gpu-box", "localhost", "old-laptop"] and table.has_focus
        await pilot.press("o", "o")  # address, then state
        assert table.sort_column == "state"
        assert keys(table) == ["gpu-box", "old-laptop", "localhost"]  # degraded, unknown, up
        table.sort_by("tps")
        assert keys(table) == ["old-laptop", "gpu-box", "localhost"]
        table.sort_by("tps")  # again: reversed
        assert keys(table) == ["localhost", "gpu-box", "old-laptop"]


async def test_the_palette_has_every_action(app: KeeperApp):
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: app.snapshot.polled, what="the first poll")
        titles = {c.title for c in keeper_commands(app)}
        for alias in ("localhost", "gpu-box", "old-laptop"):
            for action in HiveAction:
                assert f"{action.value.capitalize()} the hive on {alias}" in titles
            for what in ("Open host", "Spawn a worker on", "Download a model to", "Delete a model from",
                         "Deploy", "Check the host key of", "Follow the log of", "ssh into"):
                assert f"{what} {alias}" in titles, what
        assert {"Stop worker gpu-box-qwen2.5-7b-exl2-0", "Stop worker localhost-smollm2-0"} <= titles
        assert {"Deploy all hosts", "Start the local fleet", "Stop the local fleet", "Reload inventory",
                "Go to: Chat"} <= titles

        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), what="the palette")
        await pilot.press(*"Install the hive on gpu-box")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: any("needs the SSH deploy layer" in n for n in notifications(app)),
                       what="the install's reason")
        op = app.operations.get(1)
        assert (op.kind, op.hive, op.state) == ("hive_install", "gpu-box", "failed")


class StandInHostKeyActions(KeeperHostActions):
    """Stand-in for the SSH layer's host-key lookup (issue 3 is not merged): a fixed key, and a record of
    what the operator accepted."""

    KEY = HostKey("gpu-box", "10.0.0.7", 22, "ssh-ed25519", "SHA256:5s8bGUMvQ2Qxq0Xb9x0eWfQq1Yh2r0nH2kK3m4n5o6p",
                  known=False)

    def __init__(self, fleet) -> None:
        super().__init__(fleet)
        self.accepted: list[HostKey] = []

    async def host_key(self, alias: str) -> HostKey:
        return self.KEY

    async def accept_host_key(self, key: HostKey) -> None:
        self.accepted.append(key)


async def test_a_host_key_is_trusted_only_after_its_fingerprint_is_shown_and_accepted(tmp_path: Path):
    app = KeeperApp(str(write_inventory(tmp_path / "fleet.toml")), refresh_s=3600,
                    service_factory=StandInFleetService, actions_factory=StandInHostKeyActions)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.snapshot.polled, what="the first poll")
        app.check_host_key("gpu-box")
        await wait_for(pilot, lambda: isinstance(app.screen, HostKeyScreen), what="the host key dialog")
        shown = str(app.screen.query_one("#fingerprint", Label).content)
        assert StandInHostKeyActions.KEY.fingerprint in shown and "ssh-ed25519" in shown
        assert app.screen.query_one("#reject", Button).has_focus  # the safe answer is the default
        await pilot.press("enter")
        await wait_for(pilot, lambda: not isinstance(app.screen, HostKeyScreen), what="the dialog to close")
        assert app.hosts.accepted == []
        app.check_host_key("gpu-box")
        await wait_for(pilot, lambda: isinstance(app.screen, HostKeyScreen), what="the host key dialog")
        await pilot.click("#accept")
        await wait_for(pilot, lambda: app.hosts.accepted == [StandInHostKeyActions.KEY], what="the key to be trusted")
        assert any("trusted SHA256:" in n for n in notifications(app))
