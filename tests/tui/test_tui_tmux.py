"""Smoke test: the real ``rbee-keeper`` binary with no command opens the TUI in a real terminal (tmux),
keys are sent to it and the screen is read back with ``tmux capture-pane``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import free_port
from tests.tui.conftest import LiveFleet

pytestmark = pytest.mark.slow

KEEPER = Path(sys.executable).parent / "rbee-keeper"


class Tmux:
    """One tmux server of our own (its own socket), running one session."""

    def __init__(self, socket: str) -> None:
        self.socket = socket

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=check, timeout=10)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "tui").stdout

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "tui", *keys)

    def type(self, text: str) -> None:
        self.run("send-keys", "-t", "tui", "-l", text)

    def alive(self) -> bool:
        return self.run("has-session", "-t", "tui", check=False).returncode == 0

    def wait_for(self, *needles: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen() if self.alive() else "(the session has ended)"
            if all(n in screen for n in needles):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {needles!r}; the screen shows:\n{screen}")
            time.sleep(0.2)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    assert shutil.which("tmux"), "tmux is not installed (.ci/run installs it: apt-get install tmux)"
    server = Tmux(f"rbee-tui-test-{os.getpid()}")
    yield server
    server.run("kill-server", check=False)


def test_keeper_binary_opens_the_tui_and_answers_keys(tmux: Tmux, live_fleet: LiveFleet, home: Path, tmp_path: Path):
    # The same fleet, with SSH pointed at a closed port, so the shell action fails fast and for real.
    inventory = tmp_path / "fleet.toml"
    inventory.write_text(live_fleet.inventory.read_text().replace("[defaults]\n", f"[defaults]\nssh_port = {free_port()}\n"))
    # Textual draws on stderr: leave it on the terminal.
    command = f"env RBEE_HOME={home} TERM=xterm-256color {KEEPER} -i {inventory}"
    tmux.run("new-session", "-d", "-s", "tui", "-x", "100", "-y", "30", command)

    screen = tmux.wait_for("queen", "localhost", "up", "smollm2", timeout=60)
    assert live_fleet.queen.url in screen and "Spawn worker" in screen

    tmux.keys("?")
    tmux.wait_for("rbee-keeper", "Anywhere", "Fleet, Jobs and logs")
    tmux.keys("Escape")

    tmux.keys("F3")
    tmux.wait_for("type a message")
    tmux.type("Say hello.")
    tmux.keys("Enter")
    screen = tmux.wait_for("you: Say hello.", "tokens/s", timeout=60)
    assert "first token after" in screen

    tmux.keys("F1")
    tmux.wait_for("localhost", "Spawn worker")
    # x hands the terminal to ssh (App.suspend) and takes it back when ssh exits.
    tmux.keys("x")
    tmux.wait_for("ssh localhost exited with 255", "Spawn worker", timeout=30)
    tmux.keys("q")
    deadline = time.monotonic() + 15
    while tmux.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not tmux.alive(), "the TUI did not quit on q"
