"""A hive on the operator's own machine (``transport = "local"``), deployed end to end by the same steps as
a remote host: the keeper CLI, a real queen, the offline wheelhouse installed into a new venv, the hive
started under a pidfile, a real SmolLM2 worker answering the ``openai`` client, then a no-change redeploy,
status, stop, start and uninstall. No SSH server is involved.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI

from rbee_fleet.deploy.wheelhouse import Payload
from tests.ssh.support import Keeper, prebuild_wheelhouse
from tests.support import procs
from tests.support.procs import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass
class LocalFleet:
    keeper: Keeper
    queen: procs.Proc
    install: Path
    hive_port: int

    def ready_workers(self) -> list[dict]:
        workers = procs.http_json(f"{self.queen.url}/v1/workers")[1]["workers"]
        return [w for w in workers if w["live"] and w["heartbeat"]["state"] == "ready"]


def _ours(install: Path) -> list[str]:
    """Command lines of running processes started from ``install``."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if str(install) in line and "ps -eo" not in line]


@pytest.fixture(scope="module")
def offline_payload() -> Payload:
    return prebuild_wheelhouse()


@pytest.fixture(scope="module")
def local_fleet(module_tmp: Path, offline_payload: Payload) -> Iterator[LocalFleet]:
    home, install = module_tmp / "operator-home", module_tmp / "local hive"  # a space: paths are quoted
    queen_port, hive_port = procs.free_port(), procs.free_port()
    inventory = module_tmp / "local.toml"
    inventory.write_text(f"""
[queen]
port = {queen_port}
heartbeat_interval_s = 0.5
heartbeat_timeout_s = 2.0

[hives.here]
transport = "local"
address = "127.0.0.1"
port = {hive_port}
install_dir = "{install}"
install_source = "offline"

[[hives.here.workers]]
model = "smollm2"
threads = 1
ctx_size = 512
""")
    home.mkdir()
    queen = procs.start_queen(module_tmp, inventory, home, queen_port)
    fleet = LocalFleet(Keeper(home, inventory), queen, install, hive_port)
    try:
        yield fleet
    finally:
        ctl = install / "bin" / "rbee-hive-ctl"
        if ctl.exists():  # a failed test left the hive running
            subprocess.run([str(ctl), "stop"], capture_output=True, timeout=60, check=False)
        queen.stop()
        for line in _ours(install):
            os.kill(int(line.split()[0]), 9)


def test_a_local_hive_is_installed_started_and_serves_through_the_queen(local_fleet: LocalFleet) -> None:
    code, results, proc = local_fleet.keeper.deploy()
    here = results["here"]
    assert code == 0 and here["status"] == "changed", (here, proc.stderr[-3000:])
    assert "install rbee-fleet" in here["reason"] and here["gate"] == "passed", here
    steps = [line.removeprefix("here: ") for line in proc.stderr.splitlines() if line.startswith("here: ")]
    assert steps[0] == "connecting to this machine (local transport)", steps
    assert any(s.startswith("installing ") for s in steps), steps
    # Installed as on any host: a version directory with its own venv, `current` switched to it, a marker.
    install = local_fleet.install
    current = (install / "current").resolve()
    assert current.parent == install / "versions" and (current / ".complete").exists()
    assert json.loads((install / "marker.json").read_text())["release"] == here["version"]
    assert oct((install / "secrets" / "cluster.token").stat().st_mode & 0o777) == "0o600"
    # The hive runs from that venv, in its own session (the keeper that started it has exited).
    pid = int((install / "run" / "hive.pid").read_text())
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert os.getsid(pid) == pid and any(str(current).encode() in a or str(install).encode() in a for a in args), args
    (worker,) = wait_until(local_fleet.ready_workers, 120, "the local hive's worker")
    assert worker["heartbeat"]["hive_id"] == "here"
    hives = {h["hive_id"]: h for h in procs.http_json(f"{local_fleet.queen.url}/v1/hives")[1]["hives"]}
    assert hives["here"]["url"] == f"http://127.0.0.1:{local_fleet.hive_port}" and not hives["here"]["embedded"]
    client = OpenAI(base_url=f"{local_fleet.queen.url}/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hi."}],
                                            max_tokens=8, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.strip()


def test_a_second_deploy_changes_nothing(local_fleet: LocalFleet) -> None:
    code, results, proc = local_fleet.keeper.deploy()
    assert code == 0 and results["here"]["status"] == "ok", (results, proc.stderr[-2000:])
    assert results["here"]["reason"] == "nothing to change"
    check = local_fleet.keeper.run("deploy", "--check", "--json")
    assert check.returncode == 0 and json.loads(check.stdout)["hosts"][0]["status"] == "ok", check.stdout


def test_status_stop_start_and_logs_of_a_local_hive(local_fleet: LocalFleet) -> None:
    status = local_fleet.keeper.run("hive", "status", "here", "--json")
    body = json.loads(status.stdout)
    assert (body["transport"], body["ssh"], body["answering"]) == ("local", None, True), body
    stop = local_fleet.keeper.run("hive", "stop", "here")
    assert stop.returncode == 0, stop.stderr
    assert not [line for line in _ours(local_fleet.install) if "rbee-hive" in line or "rbee_fleet.hive" in line]
    start = local_fleet.keeper.run("hive", "start", "here")
    assert start.returncode == 0, start.stderr
    assert json.loads(local_fleet.keeper.run("hive", "status", "here", "--json").stdout)["answering"] is True
    logs = local_fleet.keeper.run("hive", "logs", "here", "-n", "50")
    assert logs.returncode == 0 and "here" in logs.stdout, logs.stdout[-2000:]


def test_uninstall_leaves_no_process_and_no_file(local_fleet: LocalFleet) -> None:
    proc = local_fleet.keeper.run("hive", "uninstall", "here")
    assert proc.returncode == 0, proc.stderr
    assert not local_fleet.install.exists()
    assert _ours(local_fleet.install) == []
    probe = local_fleet.keeper.run("hive", "status", "here", "--json")
    assert probe.returncode != 0 and "not installed" in (probe.stdout + probe.stderr)
    # The fleet's status asks the host itself once the queen has forgotten its hive: locally, no SSH.
    status = local_fleet.keeper.run("status", "--json")
    probed = json.loads(status.stdout)["probed"]["here"]
    assert (probed["state"], probed["reason"]) == ("not installed", f"no rbee-fleet under {local_fleet.install}")
