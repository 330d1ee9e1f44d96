"""Filtering, sorting and the command palette, on the fixed fleet of ``StandInQueenService`` (the reads
are a stand-in; the actions run the real service layer); the host-key dialog against a real
OpenSSH server on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
from textual.command import CommandPalette
from textual.widgets import Button, Label

from rbee_fleet.contracts.vocabulary import HiveAction
from rbee_fleet.tui.app import KeeperApp
from rbee_fleet.tui.host_rows import HostState
from rbee_fleet.tui.palette import keeper_commands
from rbee_fleet.tui.screens.host_key import HostKeyScreen
from rbee_fleet.tui.widgets.fleet_table import FleetTable
from tests.support.procs import free_port
from tests.support.sshd import USER, openssh_server, write_client_key
from tests.tui.conftest import notifications, wait_for
from tests.tui.standin import StandInHostService, StandInQueenService, write_inventory


@pytest.fixture
def app(tmp_path: Path) -> KeeperApp:
    return KeeperApp(str(write_inventory(tmp_path / "fleet.toml")), refresh_s=3600,
                     service_factory=StandInQueenService, actions_factory=StandInHostService)


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
        await pilot.press(*"Install the hive on localhost")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: any("install applies to remote hosts" in n for n in notifications(app)),
                       what="the install's reason")
        op = app.operations.get(1)
        assert (op.kind, op.hive, op.state) == ("hive_install", "localhost", "failed")


@pytest.fixture
def key_fleet(tmp_path: Path) -> Iterator[tuple[KeeperApp, asyncssh.SSHKey, int]]:
    """One remote host, served by a real OpenSSH server on loopback; no queen."""
    client_key = write_client_key(tmp_path / "id_test")
    with openssh_server(client_key, tmp_path / "sshd") as (host_key, port):
        inventory = tmp_path / "fleet.toml"
        inventory.write_text(f"""[queen]\nport = {free_port()}\n[defaults]\nssh_user = "{USER}"\n"""
                             f"""identity_file = "{client_key}"\nconnect_timeout_s = 3\n"""
                             f"""[hives.box]\naddress = "127.0.0.1"\nssh_port = {port}\n"""
                             f"""install_dir = "{tmp_path / 'box-install'}"\n""")
        yield KeeperApp(str(inventory), refresh_s=3600), host_key, port


async def test_a_host_key_is_trusted_only_after_its_fingerprint_is_shown_and_accepted(key_fleet):
    app, host_key, port = key_fleet
    fp = host_key.get_fingerprint("sha256")
    known_hosts = Path(os.environ["RBEE_HOME"]) / "known_hosts"
    async with app.run_test(size=(100, 30)) as pilot:
        # The queen is down, so the host is probed over SSH: its key is not trusted yet.
        await wait_for(pilot, lambda: "unknown host key" in (app.snapshot.row("box").reason or ""),
                       what="the probe's reason")
        assert app.snapshot.row("box").state is HostState.UNKNOWN
        app.check_host_key("box")
        await wait_for(pilot, lambda: isinstance(app.screen, HostKeyScreen), what="the host key dialog")
        shown = str(app.screen.query_one("#fingerprint", Label).content)
        assert fp in shown and "ssh-ed25519" in shown
        # The safe answer is the default: Reject gets the focus (as the screen finishes showing).
        await wait_for(pilot, lambda: app.screen.query_one("#reject", Button).has_focus, timeout=10,
                       what="Reject to have the focus")
        await pilot.press("enter")
        await wait_for(pilot, lambda: not isinstance(app.screen, HostKeyScreen), what="the dialog to close")
        assert not known_hosts.exists()
        app.check_host_key("box")
        await wait_for(pilot, lambda: isinstance(app.screen, HostKeyScreen), what="the host key dialog")
        await pilot.click("#accept")
        await wait_for(pilot, lambda: any(f"trusted {fp}" in n for n in notifications(app)), what="the key to be trusted")
        assert known_hosts.read_text().startswith(f"[127.0.0.1]:{port} ssh-ed25519 ")
        # Probed again with the key trusted: the login works and the host's real facts come back.
        await wait_for(pilot, lambda: app.snapshot.row("box").state is HostState.NOT_INSTALLED, what="a new probe")
        app.check_host_key("box")
        await wait_for(pilot, lambda: isinstance(app.screen, HostKeyScreen), what="the host key dialog")
        assert "already trusted" in str(app.screen.query_one("#key-state", Label).content)
        assert not app.screen.query("#accept")


async def test_a_changed_host_key_shows_both_fingerprints_and_cannot_be_trusted(key_fleet):
    app, host_key, port = key_fleet
    old = asyncssh.generate_private_key("ssh-ed25519")
    known_hosts = Path(os.environ["RBEE_HOME"]) / "known_hosts"
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    known_hosts.write_text(f"[127.0.0.1]:{port} {old.export_public_key().decode()}")
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: "host key changed" in (app.snapshot.row("box").reason or ""),
                       what="the probe's reason")
        app.check_host_key("box")
        await wait_for(pilot, lambda: isinstance(app.screen, HostKeyScreen), what="the host key dialog")
        assert host_key.get_fingerprint("sha256") in str(app.screen.query_one("#fingerprint", Label).content)
        state = str(app.screen.query_one("#key-state", Label).content)
        assert "CHANGED" in state and old.get_fingerprint("sha256") in state
        assert not app.screen.query("#accept")  # nothing to press
        await pilot.press("n")
        await wait_for(pilot, lambda: not isinstance(app.screen, HostKeyScreen), what="the dialog to close")
    assert known_hosts.read_text().count("\n") == 1
