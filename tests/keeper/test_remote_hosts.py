"""The keeper's remote-host service functions (shared by the CLI and the TUI) without any real host:
recorded facts, closed ports, a real OpenSSH server on loopback, and the ssh command line.

(The same functions against real OpenSSH hosts: tests/ssh.)
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from rbee_fleet.common.inventory import InventoryError, parse_inventory
from rbee_fleet.common.paths import Layout
from rbee_fleet.deploy.errors import ConnectRefused
from rbee_fleet.deploy.facts import parse_facts
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.hosts.probe import probe_host, probe_result
from rbee_fleet.keeper.hosts.remote_hive import control_hive, stream_log
from rbee_fleet.keeper.hosts.service import installed_specs, run_context
from rbee_fleet.keeper.ssh_login import ssh_command
from tests.deploy.test_facts import DEPLOYED, FRESH_DEBIAN
from tests.support import procs
from tests.support.sshd import USER, openssh_server


def closed_port() -> int:
    return procs.free_port()  # nothing listens there


def context(text: str) -> KeeperContext:
    return KeeperContext(inventory=parse_inventory(text), inventory_path=None, layout=Layout.default())


def fleet(ssh_port: int, key: Path, extra: str = "", user: str = "rbee") -> KeeperContext:
    return context(f"""
[queen]
port = {procs.free_port()}
[defaults]
ssh_user = "{user}"
identity_file = "{key}"
connect_timeout_s = 3
[hives.box]
address = "127.0.0.1"
port = {procs.free_port()}
ssh_port = {ssh_port}
{extra}""")


# -- what a probe says -------------------------------------------------------------------------------


def test_probe_results_from_recorded_facts() -> None:
    spec = installed_specs(fleet(22, Path("/k")), None)[0]
    fresh = probe_result(spec, parse_facts(FRESH_DEBIAN), at=1.0)
    assert (fresh.state, fresh.reason) == ("not installed", "no rbee-fleet under /home/rbee/.local/share/rbee-fleet")
    running = probe_result(spec, parse_facts(DEPLOYED), at=1.0)
    assert (running.state, running.version) == ("running", "0.1.0-aaaa")
    assert running.reason == "the hive runs (pid 4242, 0.1.0-aaaa)"
    stopped = probe_result(spec, parse_facts(DEPLOYED.replace("hive=running 4242\n", "")), at=1.0)
    assert (stopped.state, stopped.reason) == ("stopped", "0.1.0-aaaa is installed; the hive is not running")


async def test_probes_of_hosts_that_cannot_be_seen_say_why(client_key: Path, sshd) -> None:
    refused = fleet(closed_port(), client_key)
    probe = await probe_host(installed_specs(refused, None)[0], refused.host_keys(), at=5.0)
    assert probe.state == "unreachable" and "connection refused by rbee@127.0.0.1:" in probe.reason and probe.at == 5.0

    host_key, port = sshd
    ctx = fleet(port, client_key)
    probe = await probe_host(installed_specs(ctx, None)[0], ctx.host_keys(), at=5.0)
    assert probe.state == "unknown" and probe.reason.startswith(f"unknown host key {host_key.get_fingerprint('sha256')}")
    assert not ctx.host_keys().keeper_file.exists()  # a probe never trusts a key


async def test_a_probe_over_ssh_reads_the_hosts_real_facts(client_key: Path, sshd, tmp_path: Path) -> None:
    host_key, port = sshd
    install = tmp_path / "install"
    ctx = fleet(port, client_key, extra=f'install_dir = "{install}"\n', user=USER)
    spec = installed_specs(ctx, None)[0]
    ctx.host_keys().record("127.0.0.1", port, host_key.export_public_key().decode())
    probe = await probe_host(spec, ctx.host_keys(), at=1.0)
    assert (probe.state, probe.reason) == ("not installed", f"no rbee-fleet under {install}")
    # A release left half-unpacked does not count; a complete one, switched to, does (the hive not running).
    release = install / "versions" / "0.1.0-test"
    release.mkdir(parents=True)
    (install / "current").symlink_to(release)
    assert (await probe_host(spec, ctx.host_keys(), at=1.5)).state == "not installed"
    (release / ".complete").touch()
    probe = await probe_host(spec, ctx.host_keys(), at=2.0)
    assert (probe.state, probe.version) == ("stopped", "0.1.0-test"), probe.reason


async def test_a_silent_host_is_unreachable_within_the_connect_timeout(client_key: Path) -> None:
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    try:
        ctx = fleet(silent.sockets[0].getsockname()[1], client_key)
        spec = installed_specs(ctx, None)[0]
        probe = await probe_host(spec, ctx.host_keys(), at=0.0)
        assert probe.state == "unreachable" and "no answer within 3 s" in probe.reason
    finally:
        silent.close()


async def test_actions_on_an_unreachable_host_raise_its_reason(client_key: Path) -> None:
    ctx = fleet(closed_port(), client_key)
    spec = installed_specs(ctx, None)[0]
    run = run_context(ctx)
    seen: list[tuple[str, str]] = []
    run.update = lambda alias, message: seen.append((alias, message))
    with pytest.raises(ConnectRefused, match="connection refused"):
        await control_hive(spec, run, "stop")
    with pytest.raises(ConnectRefused):
        await stream_log(spec, run, 10, True, print)
    assert seen and seen[0][0] == "box" and seen[0][1].startswith("connecting to rbee@127.0.0.1:")


def test_installed_specs_reject_an_unknown_alias() -> None:
    with pytest.raises(InventoryError, match="no installed hive named 'nope'"):
        installed_specs(fleet(22, Path("/k")), "nope")


# -- the ssh command line of the TUI's shell action ----------------------------------------------------

JUMPS = """
[defaults]
ssh_user = "ops"
identity_file = "~/.ssh/fleet"
[hives.home]
embedded = true
[hives.edge]
address = "203.0.113.1"
ssh_port = 2201
[hives.bastion]
address = "10.0.0.1"
ssh_user = "jump"
proxy_jump = "edge"
[hives.gpu]
address = "10.0.0.7"
ssh_host = "gpu.lan"
ssh_user = "bee"
proxy_jump = "bastion"
[hives.v6]
address = "10.0.0.8"
ssh_host = "fd00::8"
proxy_jump = "[fd00::1]:2200"
[hives.cfg]
address = "10.0.0.9"
proxy_jump = "corp-bastion"
[hives.direct]
address = "10.0.0.10"
ssh_port = 2222
proxy_jump = "admin@198.51.100.4:2022"
"""


@pytest.fixture
def jumps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KeeperContext:
    # "corp-bastion" is a Host of the operator's ~/.ssh/config, as proxy_jump allows.
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host corp-bastion\n  HostName 203.0.113.5\n")
    return context(JUMPS)


def test_a_jump_host_named_by_its_hive_alias_is_reached_with_its_own_port_and_key(jumps: KeeperContext) -> None:
    key = os.path.expanduser("~/.ssh/fleet")
    known = f"UserKnownHostsFile={Path('~/.ssh/known_hosts').expanduser()} {jumps.host_keys().keeper_file}"
    creds = ["-i", key, "-o", "IdentitiesOnly=yes", "-o", known]
    # bastion -> edge (a hive): one ProxyCommand reaching edge on its port with the inventory's key.
    edge = shlex.join(["ssh", "-p", "2201", *creds, "-W", "%h:%p", "ops@203.0.113.1"])
    assert ssh_command(jumps, "bastion") == ["ssh", *creds, "-o", f"ProxyCommand={edge}", "jump@10.0.0.1"]
    # gpu -> bastion -> edge: the inner hop's tokens are escaped for the ssh that runs it.
    inner = edge.replace("%", "%%")
    bastion = shlex.join(["ssh", *creds, "-o", f"ProxyCommand={inner}", "-W", "%h:%p", "jump@10.0.0.1"])
    assert ssh_command(jumps, "gpu") == ["ssh", *creds, "-o", f"ProxyCommand={bastion}", "bee@gpu.lan"]


def test_other_jump_hosts_pass_through(jumps: KeeperContext) -> None:
    def proxy(cmd: list[str]) -> list[str]:
        return shlex.split(next(a for a in cmd if a.startswith("ProxyCommand=")).removeprefix("ProxyCommand="))

    cfg = ssh_command(jumps, "cfg")
    assert proxy(cfg)[-3:] == ["-W", "%h:%p", "corp-bastion"] and cfg[-1] == "ops@10.0.0.9"
    direct = ssh_command(jumps, "direct")
    assert direct[:3] == ["ssh", "-p", "2222"] and direct[-1] == "ops@10.0.0.10"
    assert proxy(direct)[:3] == ["ssh", "-p", "2022"] and proxy(direct)[-1] == "admin@198.51.100.4"
    v6 = ssh_command(jumps, "v6")
    assert proxy(v6)[:3] == ["ssh", "-p", "2200"] and proxy(v6)[-1] == "fd00::1" and v6[-1] == "ops@fd00::8"


async def test_the_shell_command_logs_in_through_a_jump_host_with_the_inventorys_key(
        client_key: Path, sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real OpenSSH on both ends: the key is in no default place, the host keys only in the keeper's file."""
    host_key, port = sshd
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh of the operator's to lean on
    with openssh_server(client_key, tmp_path / "jump") as (jump_key, jump_port):
        ctx = context(f"""
[defaults]
ssh_user = "{USER}"
identity_file = "{client_key}"
[hives.gate]
address = "127.0.0.1"
port = {procs.free_port()}
ssh_port = {jump_port}
[hives.box]
address = "127.0.0.1"
port = {procs.free_port()}
ssh_port = {port}
proxy_jump = "gate"
""")
        keys = ctx.host_keys()
        keys.record("127.0.0.1", jump_port, jump_key.export_public_key().decode())
        keys.record("127.0.0.1", port, host_key.export_public_key().decode())
        cmd = ssh_command(ctx, "box")
        cmd[1:1] = ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
        login = await asyncio.to_thread(subprocess.run, [*cmd, "echo", "in-through-the-gate"], capture_output=True,
                                        text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert login.stdout.strip() == "in-through-the-gate", login.stderr
        # A gate whose key is not trusted stops the login: the jump is checked against the same files.
        keys.keeper_file.write_text(keys.keeper_file.read_text().splitlines()[1] + "\n")
        refused = await asyncio.to_thread(subprocess.run, [*cmd, "true"], capture_output=True, text=True,
                                          timeout=30, stdin=subprocess.DEVNULL)
        assert refused.returncode != 0 and "Host key verification failed" in refused.stderr


def test_ssh_command_refuses_what_it_cannot_reach(jumps: KeeperContext) -> None:
    from rbee_fleet.common.errors import OperationFailed

    with pytest.raises(OperationFailed, match="no host 'ghost'"):
        ssh_command(jumps, "ghost")
    looped = context(JUMPS.replace('proxy_jump = "edge"', 'proxy_jump = "gpu"'))
    with pytest.raises(OperationFailed, match="loops back"):
        ssh_command(looped, "gpu")
