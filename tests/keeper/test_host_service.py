"""Host actions: the embedded hive's plan, remote hosts over SSH (unreachable ones, a real OpenSSH server
on loopback), the log tail. Against real OpenSSH hosts: tests/ssh/test_tui_remote.py."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.inventory import parse_inventory
from rbee_fleet.common.paths import Layout
from rbee_fleet.contracts.vocabulary import HiveAction
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.hosts.service import HostService
from rbee_fleet.keeper.log_follow import follow_file
from rbee_fleet.keeper.queen_service import QueenService
from tests.support import procs
from tests.support.sshd import USER

INVENTORY = """
[queen]
port = {port}
[defaults]
ssh_user = "{user}"
identity_file = "{key}"
connect_timeout_s = 3
[hives.home]
embedded = true
[[hives.home.workers]]
model = "smollm2"
[hives.gone]
address = "127.0.0.1"
port = {hive1}
ssh_port = {closed}
[[hives.gone.workers]]
model = "smollm2"
[hives.box]
address = "127.0.0.1"
port = {hive2}
ssh_port = {sshd}
install_dir = "{install}"
"""


def make_ctx(client_key: Path, sshd_port: int, install: Path, queen_port: int | None = None) -> KeeperContext:
    inv = parse_inventory(INVENTORY.format(port=queen_port or procs.free_port(), key=client_key, closed=procs.free_port(),
                                           sshd=sshd_port, hive1=procs.free_port(), hive2=procs.free_port(),
                                           user=USER, install=install))
    return KeeperContext(inventory=inv, inventory_path=None, layout=Layout.default())


@pytest.fixture
async def actions(client_key: Path, sshd, tmp_path: Path) -> AsyncIterator[HostService]:
    fleet = QueenService(make_ctx(client_key, sshd[1], tmp_path / "box-install"))
    yield HostService(fleet)
    await fleet.close()


async def test_the_plan_checks_remote_hosts_and_says_why_one_fails(actions: HostService, sshd):
    host_key, _ = sshd
    steps = await actions.plan(["home", "gone", "box"])
    assert [(s.alias, s.what, s.status) for s in steps] == [
        ("home", "queen", "change"), ("home", "home-smollm2-0", "change"),
        ("gone", "host", "failed"), ("box", "host", "failed")]
    assert f"connection refused by {USER}@127.0.0.1:" in steps[2].detail
    assert f"unknown host key {host_key.get_fingerprint('sha256')}" in steps[3].detail
    assert not (Path(os.environ["RBEE_HOME"]) / "known_hosts").exists()


async def test_remote_hive_actions_fail_with_the_hosts_reason(actions: HostService):
    events = []
    with pytest.raises(OperationFailed, match=f"gone: connection refused by {USER}@127.0.0.1:"):
        await actions.hive("gone", HiveAction.STOP, lambda label, ev: events.append((label, ev.message)))
    assert events[0][0] == "gone" and events[0][1].startswith(f"connecting to {USER}@127.0.0.1:")
    with pytest.raises(OperationFailed, match="gone: connection refused"):
        async for _ in actions.follow_log("gone"):
            pass
    with pytest.raises(OperationFailed, match="embedded hive"):
        await actions.hive("home", HiveAction.UNINSTALL)
    with pytest.raises(OperationFailed, match="no host 'ghost'"):
        await actions.hive("ghost", HiveAction.START)
    # Stopping a local queen that is not running changes nothing and says so.
    assert await actions.hive("home", HiveAction.STOP) == {"stopped": False}
    assert [a for a in HiveAction if a.destructive] == [HiveAction.STOP, HiveAction.RESTART, HiveAction.UNINSTALL]


async def test_a_new_host_key_is_shown_then_trusted_only_when_accepted(actions: HostService, sshd, tmp_path):
    host_key, port = sshd
    with pytest.raises(OperationFailed, match="does not reach it over SSH"):
        await actions.host_key("home")
    key = await actions.host_key("box")
    assert (key.alias, key.state, key.fingerprint) == ("box", "unknown", host_key.get_fingerprint("sha256"))
    known_hosts = Path(os.environ["RBEE_HOME"]) / "known_hosts"
    assert not known_hosts.exists()  # looking records nothing
    await actions.accept_host_key(key)
    assert known_hosts.read_text().startswith(f"[127.0.0.1]:{port} ssh-ed25519 ")
    assert (await actions.host_key("box")).state == "known"
    probe = await actions.probe("box")  # the login works now: the host's real facts
    assert (probe.state, probe.reason) == ("not installed", f"no rbee-fleet under {tmp_path / 'box-install'}")


async def test_a_changed_host_key_is_refused_with_both_fingerprints(actions: HostService, sshd):
    host_key, port = sshd
    old = asyncssh.generate_private_key("ssh-ed25519")
    known_hosts = Path(os.environ["RBEE_HOME"]) / "known_hosts"
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    known_hosts.write_text(f"[127.0.0.1]:{port} {old.export_public_key().decode()}")
    key = await actions.host_key("box")
    assert key.state == "changed" and key.expected == (old.get_fingerprint("sha256"),)
    with pytest.raises(OperationFailed) as info:
        await actions.accept_host_key(key)
    assert old.get_fingerprint("sha256") in str(info.value) and host_key.get_fingerprint("sha256") in str(info.value)
    probe = await actions.probe("box")
    assert probe.state == "unknown" and probe.reason.startswith("host key changed: expected")
    # The refusal names the keeper's own file and the command that forgets the key there.
    assert f"rbee-keeper hive forget-key box` (it is recorded in the keeper's own {known_hosts})" in probe.reason

    # Forgotten, the host's key is new again: shown, then trusted once accepted; both are audited.
    assert actions.forget_host_key("box") == (known_hosts, 1)
    assert known_hosts.read_text() == "" and oct(known_hosts.stat().st_mode & 0o777) == "0o600"
    key = await actions.host_key("box")
    assert (key.state, key.fingerprint) == ("unknown", host_key.get_fingerprint("sha256"))
    await actions.accept_host_key(key)
    assert (await actions.host_key("box")).state == "known"
    assert actions.forget_host_key("gone") == (known_hosts, 0)  # nothing recorded for it
    audit = [(e.action, e.targets, e.result) for e in actions.changes.audit.read()]
    assert audit == [("host-key accept", ("box",), "failed"), ("host-key forget", ("box",), "ok"),
                     ("host-key accept", ("box",), "ok"), ("host-key forget", ("gone",), "ok")]


async def test_remote_deploys_fail_alone_each_with_its_reason(client_key: Path, sshd, tmp_path: Path):
    """A real queen (no workers) is running, as deploys spawn remote workers through it."""
    port = procs.free_port()
    ctx = make_ctx(client_key, sshd[1], tmp_path / "box-install", port)
    inventory = procs.write_inventory(tmp_path / "queen.toml", port=port, worker_port_base=procs.free_port_range(4),
                                      workers=[])
    queen = procs.start_queen(tmp_path, inventory, tmp_path / "queen-home", port)
    fleet = QueenService(ctx)
    try:
        events: list[tuple[str, str]] = []
        outcomes = await HostService(fleet).deploy(["gone", "box"], lambda label, ev: events.append((label, ev.message)))
        assert [(o.alias, o.ok) for o in outcomes] == [("gone", False), ("box", False)]
        assert "connection refused" in (outcomes[0].error or "")
        assert "unknown host key" in (outcomes[1].error or "")
        assert ("gone", f"failed: {outcomes[0].error}") in events and ("box", f"failed: {outcomes[1].error}") in events
    finally:
        await fleet.close()
        queen.stop()


async def test_follow_file_waits_tails_and_survives_truncation_and_replacement(tmp_path: Path):
    path = tmp_path / "hive.log"
    lines: list[str] = []

    async def reader() -> None:
        async for line in follow_file(path, lines=2, poll_s=0.02):
            lines.append(line)

    async def until(n: int) -> None:
        for _ in range(250):
            if len(lines) >= n:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"only {lines}")

    task = asyncio.create_task(reader())
    try:
        await until(1)
        assert lines[0].startswith("(no log at")
        path.write_text("one\ntwo\nthree\n")
        await until(3)
        assert lines[1:] == ["two", "three"]  # the last two lines first
        with open(path, "a") as fh:
            fh.write("four\nfive (half")  # a partial line waits for its end
        await until(4)
        await asyncio.sleep(0.1)
        assert lines[3:] == ["four"]
        with open(path, "a") as fh:
            fh.write(")\n")
        await until(5)
        assert lines[4] == "five (half)"
        path.write_text("new\n")  # truncated (log rotated in place)
        await until(6)
        assert lines[5] == "new"
        replacement = tmp_path / "next.log"
        replacement.write_text("fresh file\n")
        os.replace(replacement, path)
        await until(7)
        assert lines[6] == "fresh file"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_operations_at_once_share_one_wheelhouse_builder(actions: HostService):
    """The TUI deploys each host as its own operation: they must not build the same wheelhouse twice at once."""
    first, second = actions.tui_run(None), actions.tui_run(None)
    assert first is not second and first.builder is second.builder
