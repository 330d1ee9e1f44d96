"""The local transport on real processes: commands, their environment, timeouts, streamed output, copies;
and how an inventory declares a hive that uses it.

(A whole deploy of a local hive through it: tests/deploy/test_local_hive.py.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.inventory import InventoryError, parse_inventory
from rbee_fleet.common.paths import Layout
from rbee_fleet.deploy.connect import open_transport
from rbee_fleet.deploy.errors import CommandTimeout, ConnectFailed
from rbee_fleet.deploy.host_keys import HostKeyStore
from rbee_fleet.deploy.hosts import host_spec, select
from rbee_fleet.deploy.local_transport import CHUNK, LocalTransport, login_environment
from rbee_fleet.deploy.targets import LocalTarget, SSHTarget
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.hosts.service import HostService
from rbee_fleet.keeper.queen_service import QueenService
from rbee_fleet.keeper.ssh_login import ssh_command
from tests.support.procs import wait_until

INVENTORY = """
[hives.here]
transport = "local"
port = 9100
install_dir = "/tmp/rbee-local-test"

[hives.far]
address = "10.0.0.7"
ssh_user = "ops"
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not reaped yet) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


async def test_commands_run_here_with_their_status_output_and_input() -> None:
    t = LocalTransport("here")
    ok = await t.run("echo out; echo err >&2; exit 3", timeout=10)
    assert (ok.exit_status, ok.stdout, ok.stderr, ok.ok) == (3, "out\n", "err\n", False)
    assert ok.tail() == "err"
    echoed = await t.run("cat", timeout=10, input="the payload\n")
    assert echoed.ok and echoed.stdout == "the payload\n"
    # No input: the command reads end-of-file at once rather than waiting on the keeper's terminal.
    assert (await t.run("cat; echo done", timeout=10)).stdout == "done\n"
    # A POSIX shell, from the home directory, as an SSH command would start.
    where = await t.run("pwd; echo $0", timeout=10)
    assert where.stdout.split() == [str(Path.home()), "/bin/sh"]
    await t.close()


async def test_the_keepers_environment_does_not_leak_into_the_host() -> None:
    venv = Path(sys.prefix)
    keeper_env = {**os.environ, "VIRTUAL_ENV": str(venv), "PYTHONPATH": "/somewhere", "RBEE_HOME": "/keeper/home",
                  "RBEE_INVENTORY": "x.toml", "PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin", "LC_TIME": "C",
                  "HOME": "/home/op"}
    env = login_environment(keeper_env)
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin" and env["HOME"] == "/home/op" and env["LC_TIME"] == "C"
    assert not {"VIRTUAL_ENV", "PYTHONPATH", "RBEE_HOME", "RBEE_INVENTORY"} & set(env)
    # In a real command: python3 is the system's, not the keeper's virtualenv.
    os.environ["RBEE_SECRET_PROBE"] = "must-not-pass"
    try:
        t = LocalTransport("here", {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{venv}/bin:{os.environ['PATH']}"})
        seen = await t.run("env; command -v python3", timeout=10)
    finally:
        del os.environ["RBEE_SECRET_PROBE"]
    assert "must-not-pass" not in seen.stdout and "VIRTUAL_ENV=" not in seen.stdout
    assert not seen.stdout.strip().splitlines()[-1].startswith(str(venv))


async def test_a_timeout_kills_the_command_and_its_children_but_not_what_it_detached(tmp_path: Path) -> None:
    t = LocalTransport("here")
    pids = tmp_path / "pids"
    command = (f"sleep 60 & echo $! > {pids}.child; setsid sleep 60 </dev/null >/dev/null 2>&1 & echo $! > {pids}.detached; "
               "sleep 60")
    with pytest.raises(CommandTimeout, match="here: no answer within 1 s to: sleep 60 &"):
        await t.run(command, timeout=1)
    child, detached = int(Path(f"{pids}.child").read_text()), int(Path(f"{pids}.detached").read_text())
    try:
        wait_until(lambda: not _alive(child), 5, "the command's own child to die")
        assert _alive(detached)  # what a command starts in its own session (a hive) outlives it
    finally:
        os.kill(detached, signal.SIGKILL)


async def test_cancelling_a_command_kills_it(tmp_path: Path) -> None:
    t = LocalTransport("here")
    pid_file = tmp_path / "pid"
    task = asyncio.ensure_future(t.run(f"echo $$ > {pid_file}; exec sleep 60", timeout=None))
    await asyncio.sleep(0.5)
    pid = int(pid_file.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    wait_until(lambda: not _alive(pid), 5, "the cancelled command to die")


async def test_streamed_output_comes_line_by_line_with_the_exit_status() -> None:
    t = LocalTransport("here")
    lines: list[str] = []
    code = await t.stream("echo one; echo two >&2; printf 'three'; exit 4", lines.append, timeout=10)
    assert (code, lines) == (4, ["one", "two", "three"])
    with pytest.raises(CommandTimeout, match="no end within 1 s"):
        await t.stream("echo start; sleep 30", lines.append, timeout=1)
    assert lines[-1] == "start"


async def test_a_copy_reports_progress_and_a_bad_destination_names_the_host(tmp_path: Path) -> None:
    src = tmp_path / "payload.tgz"
    data = os.urandom(CHUNK * 2 + 12345)
    src.write_bytes(data)
    seen: list[tuple[int, int]] = []
    t = LocalTransport("here")
    await t.put(src, str(tmp_path / "copy.tgz"), lambda sent, total: seen.append((sent, total)))
    assert (tmp_path / "copy.tgz").read_bytes() == data
    assert [s for s, _ in seen] == [CHUNK, 2 * CHUNK, len(data)] and {total for _, total in seen} == {len(data)}
    with pytest.raises(ConnectFailed, match=r"here: copying payload.tgz to /nonexistent/dir/x failed: No such file"):
        await t.put(src, "/nonexistent/dir/x")


async def test_open_transport_picks_the_local_one_without_any_key(tmp_path: Path) -> None:
    keys = HostKeyStore(tmp_path / "known_hosts", user_files=())
    t = await open_transport(LocalTarget("here"), keys)
    assert isinstance(t, LocalTransport) and t.host == "here"
    assert (await t.run("true", timeout=5)).ok
    assert not (tmp_path / "known_hosts").exists()


# -- the inventory --------------------------------------------------------------------------------


def test_a_local_hive_is_installed_like_the_others_but_reached_without_ssh() -> None:
    inv = parse_inventory(INVENTORY, "lab.toml")
    assert select(inv, None) == ["here", "far"] and select(inv, "here") == ["here"]
    here, far = host_spec(inv, "here"), host_spec(inv, "far")
    assert here.target == LocalTarget("here", 10.0) and here.url == "http://127.0.0.1:9100"
    assert here.target.describe() == "this machine (local transport)"
    assert isinstance(far.target, SSHTarget) and far.target.describe() == "ops@10.0.0.7"


@pytest.mark.parametrize(("old", "new", "key", "line", "message"), [
    ('install_dir = "/tmp/rbee-local-test"', 'ssh_user = "ops"', "hives.here.ssh_user", 5,
     'ssh_user does not apply to a hive with transport = "local" (it is not reached over SSH)'),
    ('install_dir = "/tmp/rbee-local-test"', 'proxy_jump = "far"', "hives.here.proxy_jump", 5, "proxy_jump does not apply"),
    ('transport = "local"', 'transport = "telnet"', "hives.here.transport", 3, "Input should be 'ssh' or 'local'"),
])
def test_inventory_mistakes_about_the_transport_name_the_key_and_line(old: str, new: str, key: str, line: int,
                                                                     message: str) -> None:
    with pytest.raises(InventoryError) as info:
        parse_inventory(INVENTORY.replace(old, new), "lab.toml")
    assert (info.value.key, info.value.line) == (key, line), str(info.value)
    assert message in str(info.value)


def test_the_embedded_hive_takes_no_transport() -> None:
    with pytest.raises(InventoryError, match=r"lab.toml:3: hives.box.transport: the embedded hive runs inside the queen"):
        parse_inventory('[hives.box]\nembedded = true\ntransport = "local"\n', "lab.toml")


async def test_host_key_actions_refuse_a_local_hive_and_its_shell_is_a_local_one() -> None:
    ctx = KeeperContext(inventory=parse_inventory(INVENTORY), inventory_path=None, layout=Layout.default())
    service = HostService(QueenService(ctx))
    with pytest.raises(OperationFailed, match='here is on this machine .transport = "local".: it is not reached over SSH'):
        await service.host_key("here")
    with pytest.raises(OperationFailed, match="has no host key"):
        service.forget_host_key("here")
    shell = ssh_command(ctx, "here")
    assert shell[:3] == ["/bin/sh", "-c", 'cd "$1" 2>/dev/null || cd; exec "$2" -l'] and shell[4] == "/tmp/rbee-local-test"
    assert ssh_command(ctx, "far")[0] == "ssh"
