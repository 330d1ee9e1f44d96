"""The keeper's deploy and hive commands without any host: help, usage errors, nothing to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rbee_fleet.contracts.vocabulary import HIVE_COMMANDS


def keeper(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RBEE_HOME": str(home), "COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "rbee_fleet.keeper", *args], capture_output=True, text=True,
                          timeout=60, env=env, stdin=subprocess.DEVNULL, check=False)


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
    assert "--limit: no installed hive named 'box9' (installed hives: box1, box2)" in result.stderr
    assert not (tmp_path / "home").exists()  # no token, no known_hosts, no queen
    result = keeper("hive", "status", "box7", "-i", str(inv), home=tmp_path / "home")
    assert result.returncode == 2 and "no installed hive named 'box7'" in result.stderr


def test_a_bad_proxy_jump_names_file_line_and_key(tmp_path: Path) -> None:
    inv = tmp_path / "fleet.toml"
    inv.write_text(INVENTORY.replace('proxy_jump = "box1"', 'proxy_jump = "box0"'))
    result = keeper("deploy", "-i", str(inv), home=tmp_path / "home")
    assert result.returncode == 2
    assert f"{inv}:9: hives.box2.proxy_jump: 'box0' is neither a hive alias" in result.stderr


def test_an_inventory_without_remote_hives_has_nothing_to_deploy(tmp_path: Path) -> None:
    inv = tmp_path / "local.toml"
    inv.write_text("[hives.here]\nembedded = true\n")
    result = keeper("deploy", "-i", str(inv), home=tmp_path / "home")
    assert result.returncode == 0 and "declares no remote hives" in result.stderr


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
