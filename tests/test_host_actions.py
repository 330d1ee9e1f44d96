"""Host actions: the embedded hive's plan, what remote hosts need, the log tail and the ssh command line."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.inventory import parse_inventory
from rbee_fleet.common.paths import Layout
from rbee_fleet.keeper.fleet_service import FleetService
from rbee_fleet.keeper.host_actions import (
    DeployUnavailable,
    HiveAction,
    HostKey,
    KeeperHostActions,
    follow_file,
    ssh_command,
)
from rbee_fleet.keeper.services import KeeperContext
from tests.support import procs

INVENTORY = """
[queen]
port = {port}
[defaults]
ssh_user = "ops"
ssh_port = 2222
identity_file = "~/.ssh/fleet"
[hives.home]
embedded = true
[[hives.home.workers]]
model = "smollm2"
[hives.gpu]
address = "10.0.0.7"
ssh_host = "gpu.lan"
ssh_user = "bee"
ssh_port = 22
proxy_jump = "bastion"
[hives.nas]
address = "10.0.0.9"
"""


@pytest.fixture
def ctx(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KeeperContext:
    # "bastion" is a Host of the operator's ~/.ssh/config, as proxy_jump allows.
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host bastion\n  HostName 203.0.113.5\n")
    inv = parse_inventory(INVENTORY.format(port=procs.free_port()))
    return KeeperContext(inventory=inv, inventory_path=None, layout=Layout.default())


async def test_plan_and_deploy_without_a_queen(ctx: KeeperContext):
    fleet = FleetService(ctx)
    actions = KeeperHostActions(fleet)
    try:
        steps = await actions.plan(["home", "gpu"])
        assert [(s.alias, s.what, s.status) for s in steps] == [
            ("home", "queen", "change"), ("home", "home-smollm2-0", "change"), ("gpu", "hive", "unavailable")]
        assert "needs the SSH deploy layer" in steps[-1].detail
        # Remote hosts fail alone, each with its reason.
        outcomes = await actions.deploy(["gpu", "nas"])
        assert [(o.alias, o.ok) for o in outcomes] == [("gpu", False), ("nas", False)]
        assert all("issue 3" in (o.error or "") for o in outcomes)
    finally:
        await fleet.close()


async def test_what_each_host_kind_can_do(ctx: KeeperContext):
    fleet = FleetService(ctx)
    actions = KeeperHostActions(fleet)
    try:
        with pytest.raises(DeployUnavailable, match="hive install on gpu needs the SSH deploy layer"):
            await actions.hive("gpu", HiveAction.INSTALL)
        with pytest.raises(OperationFailed, match="embedded hive"):
            await actions.hive("home", HiveAction.UNINSTALL)
        with pytest.raises(OperationFailed, match="no host 'ghost'"):
            await actions.hive("ghost", HiveAction.START)
        with pytest.raises(OperationFailed, match="does not reach it over SSH"):
            await actions.host_key("home")
        with pytest.raises(DeployUnavailable):
            await actions.host_key("gpu")
        with pytest.raises(DeployUnavailable):
            await actions.accept_host_key(HostKey("gpu", "gpu.lan", 22, "ssh-ed25519", "SHA256:x", known=False))
        with pytest.raises(DeployUnavailable):
            actions.follow_log("gpu")
        # Stopping a local queen that is not running changes nothing and says so.
        assert await actions.hive("home", HiveAction.STOP) == {"stopped": False}
        assert [a for a in HiveAction if a.destructive] == [HiveAction.STOP, HiveAction.RESTART, HiveAction.UNINSTALL]
    finally:
        await fleet.close()


def test_ssh_command_lines(ctx: KeeperContext):
    key = os.path.expanduser("~/.ssh/fleet")
    assert ssh_command(ctx, "gpu") == ["ssh", "-i", key, "-J", "bastion", "bee@gpu.lan"]
    assert ssh_command(ctx, "nas") == ["ssh", "-p", "2222", "-i", key, "ops@10.0.0.9"]
    with pytest.raises(OperationFailed):
        ssh_command(ctx, "ghost")


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
