"""The keeper's deploy and hive commands without any host: help, usage errors, nothing to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rbee_fleet.contracts.vocabulary import HIVE_COMMANDS
from tests.support import procs


def keeper(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RBEE_HOME": str(home), "COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "rbee_fleet.keeper", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL, check=False)


@pytest.mark.parametrize("args", [["deploy"], *(["hive", action] for action in HIVE_COMMANDS), ["hive", "forget-key"],
                                  ["lock", "status"], ["lock", "release"], ["audit"], ["down"]])
def test_every_fleet_command_has_help(args: list[str], tmp_path: Path) -> None:
    result = keeper(*args, "--help", home=tmp_path)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


INVENTORY = """\
[queen]
port = 8599

[hives.box1]
address = "127.0.0.2"

[hives.box2]
address = "127.0.0.3"
proxy_jump = "box1"
"""


def test_unknown_limit_alias_is_a_usage_error_that_touches_nothing(tmp_path: Path) -> None:
    inv = tmp_path / "fleet.toml"
    inv.write_text(INVENTORY)
    result = keeper("deploy", "-i", str(inv), "--limit", "box1,box9", home=tmp_path / "home")
    assert result.returncode == 2
    assert "--limit: no hive named 'box9' (hives: box1, box2)" in result.stderr
    assert not (tmp_path / "home").exists()  # no token, no known_hosts, no queen
    result = keeper("hive", "status", "box7", "-i", str(inv), home=tmp_path / "home")
    assert result.returncode == 2 and "no installed hive named 'box7'" in result.stderr


def test_a_bad_proxy_jump_names_file_line_and_key(tmp_path: Path) -> None:
    inv = tmp_path / "fleet.toml"
    inv.write_text(INVENTORY.replace('proxy_jump = "box1"', 'proxy_jump = "box0"'))
    result = keeper("deploy", "-i", str(inv), home=tmp_path / "home")
    assert result.returncode == 2
    assert f"{inv}:9: hives.box2.proxy_jump: 'box0' is neither a hive alias" in result.stderr


def test_an_inventory_without_hives_has_nothing_to_deploy(tmp_path: Path) -> None:
    inv = tmp_path / "empty.toml"
    inv.write_text("[queen]\nport = 8599\n")
    result = keeper("deploy", "-i", str(inv), home=tmp_path / "home")
    assert result.returncode == 0 and "declares no hives; nothing to deploy" in result.stderr


@pytest.mark.slow
def test_deploy_brings_the_embedded_host_up_like_any_other(tmp_path: Path) -> None:
    """The CLI's deploy covers the embedded host as the TUI's does: the queen started, the workers spawned,
    the health gate passed (a completion pinned to the host), then nothing to change."""
    port = procs.free_port()
    inv = tmp_path / "local.toml"
    inv.write_text(f"[queen]\nport = {port}\n[hives.here]\nembedded = true\n"
                   "[[hives.here.workers]]\nmodel = \"smollm2\"\nthreads = 1\nctx_size = 512\n")
    home = tmp_path / "home"
    try:
        check = keeper("deploy", "-i", str(inv), "--check", "--json", home=home)
        (planned,) = json.loads(check.stdout)["hosts"]
        assert check.returncode == 0 and planned["status"] == "changed", check.stdout + check.stderr
        assert planned["reason"] == f"would start the queen at http://127.0.0.1:{port}"
        assert not procs.port_open("127.0.0.1", port)  # checking started nothing
        first = keeper("deploy", "-i", str(inv), "--json", home=home, timeout=300)
        (done,) = json.loads(first.stdout)["hosts"]
        assert first.returncode == 0 and done["status"] == "changed", first.stdout + first.stderr
        assert done["reason"].startswith(f"started the queen at http://127.0.0.1:{port}"), done
        assert done["gate"] == "passed"  # so the worker is ready and answered a completion pinned to "here"
        (worker,) = procs.http_json(f"http://127.0.0.1:{port}/v1/workers")[1]["workers"]
        assert worker["heartbeat"]["hive_id"] == "here" and worker["heartbeat"]["state"] == "ready"
        again = keeper("deploy", "-i", str(inv), "--json", home=home, timeout=300)
        (same,) = json.loads(again.stdout)["hosts"]
        assert (same["status"], same["reason"]) == ("ok", "nothing to change"), same
        assert keeper("deploy", "-i", str(inv), "--limit", "nope", home=home).stderr.count("no hive named 'nope' (hives: here)") == 1
        embedded = keeper("hive", "stop", "here", "-i", str(inv), home=home)
        assert embedded.returncode == 2 and ("'here' is the hive embedded in the queen, not an installed one: "
                                             "`rbee-keeper up`, `down` and `deploy` manage it") in " ".join(embedded.stderr.split())
    finally:
        keeper("down", "-i", str(inv), home=home)


def test_a_source_that_is_not_a_checkout_is_a_clear_error_before_any_connection(tmp_path: Path) -> None:
    inv = tmp_path / "fleet.toml"
    inv.write_text(INVENTORY)
    broken = tmp_path / "broken"
    (broken / "rbee_fleet").mkdir(parents=True)
    (broken / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (broken / "rbee_fleet" / "_version.py").write_text("__version__ = (\n")
    cases = {
        tmp_path / "nowhere": "--source {src}: no such directory",
        tmp_path: f"--source {tmp_path}: not an rbee-fleet checkout (no pyproject.toml and no rbee_fleet/_version.py)",
        broken: f"{broken}: rbee_fleet/_version.py cannot be read: SyntaxError",
    }
    for src, message in cases.items():
        for args in (["hive", "upgrade", "box1"], ["deploy"]):
            result = keeper(*args, "-i", str(inv), "--source", str(src), "--json", home=tmp_path / "home")
            assert result.returncode == 1, result.stderr
            assert "Traceback" not in result.stderr and "connecting" not in result.stderr
            assert json.loads(result.stdout)["ok"] is False
            assert message.format(src=src) in json.loads(result.stdout)["error"], result.stdout
