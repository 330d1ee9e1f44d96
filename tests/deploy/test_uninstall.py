"""``hive uninstall`` removes only what an install created, and nothing where no install is.

The uninstall's shell runs for real with bash on this machine, in a scratch HOME (the SSH part is
what the tests/ssh end-to-end tests cover; here the point is what the script deletes).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from rbee_fleet.deploy.errors import CommandFailed
from rbee_fleet.deploy.facts import parse_facts
from rbee_fleet.deploy.steps import uninstall
from rbee_fleet.deploy.transport import RunResult
from tests.deploy.test_facts import FRESH_DEBIAN
from tests.deploy.test_plan import spec


class LocalShell:
    """Runs the commands a transport would run on a host, with bash here and HOME set to ``home``."""

    host = "local"

    def __init__(self, home: Path) -> None:
        self.env = {**os.environ, "HOME": str(home)}

    async def run(self, command: str, *, timeout: float | None = None, input: str | None = None) -> RunResult:
        proc = await asyncio.create_subprocess_exec("bash", "-c", command, env=self.env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        return RunResult(proc.returncode or 0, out.decode(), err.decode())


def facts_for(home: Path, install_dir: Path, extra: str = "") -> object:
    text = FRESH_DEBIAN.replace("/home/rbee/.local/share/rbee-fleet", str(install_dir)).replace("/home/rbee", str(home))
    return parse_facts(text + extra)


async def test_uninstall_removes_the_install_and_keeps_foreign_files(tmp_path):
    home = tmp_path / "home"
    inst = home / ".local" / "share" / "rbee-fleet"
    for sub in ("bin", "versions/0.1.0-aaaa/venv", "secrets", "logs", "models/m"):
        (inst / sub).mkdir(parents=True)
    (inst / "marker.json").write_text("{}")
    (inst / "current").symlink_to("versions/0.1.0-aaaa")
    (inst / "notes-of-the-admin.txt").write_text("mine")
    assert await uninstall(LocalShell(home), spec(), facts_for(home, inst, "marker={}\nversion_dir=0.1.0-aaaa\n"))
    assert sorted(p.name for p in inst.iterdir()) == ["notes-of-the-admin.txt"]


async def test_uninstall_of_a_fully_owned_install_removes_its_directories(tmp_path):
    home = tmp_path / "home"
    inst = home / ".local" / "share" / "rbee-fleet"
    (inst / "versions").mkdir(parents=True)
    (inst / "marker.json").write_text("{}")
    assert await uninstall(LocalShell(home), spec(), facts_for(home, inst, "marker={}\n"))
    assert not (home / ".local").exists() and home.is_dir()


@pytest.mark.parametrize("where", ["home", "data"])
async def test_uninstall_refuses_a_directory_that_holds_no_install(tmp_path, where):
    home = tmp_path / "home"
    target = home if where == "home" else home / "photos"
    target.mkdir(parents=True)
    (target / "precious.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(CommandFailed, match="holds no rbee-fleet install"):
        await uninstall(LocalShell(home), spec(), facts_for(home, target, "hive=running 1\n"))
    assert (target / "precious.jpg").exists()


async def test_uninstall_refuses_the_home_even_with_a_marker(tmp_path):
    home = tmp_path / "home"
    (home / "versions").mkdir(parents=True)
    (home / "marker.json").write_text("{}")
    (home / "thesis.tex").write_text("chapter 1")
    with pytest.raises(CommandFailed, match="home directory"):
        await uninstall(LocalShell(home), spec(), facts_for(home, home, "marker={}\n"))
    assert (home / "thesis.tex").exists() and (home / "versions").exists()
