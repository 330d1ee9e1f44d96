"""The keeper binary's TUI entry points, and CLI paths moved onto the shared service layer that
tests/keeper/test_keeper_cli.py does not cover; the real binary against a real queen and worker."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import procs

pytestmark = pytest.mark.slow

KEEPER = str(Path(sys.executable).parent / "rbee-keeper")


@pytest.fixture(scope="module")
def fleet(module_tmp: Path) -> Iterator[tuple[procs.Proc, Path]]:
    port = procs.free_port()
    inventory = procs.write_inventory(module_tmp / "fleet.toml", port=port, worker_port_base=procs.free_port_range(4),
                                      workers=[{"model": "smollm2", "threads": 1, "ctx_size": 512}])
    queen = procs.start_queen(module_tmp, inventory, module_tmp / "home", port)
    try:
        procs.wait_workers_ready(queen, 1)
        yield queen, inventory
    finally:
        queen.stop()


def keeper(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KEEPER, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"})


def test_no_command_off_a_terminal_prints_help():
    done = keeper()
    assert done.returncode == 2 and "tui" in done.stdout and "opens the TUI" in done.stdout
    assert "--refresh" in keeper("tui", "--help").stdout


def test_stopping_an_unknown_worker_fails_with_the_reason(fleet, monkeypatch):
    queen, inventory = fleet
    monkeypatch.setenv("RBEE_HOME", str(queen.extra["home"]))  # the operator's home, with the cluster token
    stop = keeper("worker", "stop", "no-such-worker", "-i", str(inventory))
    assert stop.returncode == 1 and "no-such-worker" in stop.stderr


def test_down_leaves_a_queen_it_did_not_start(fleet):
    queen, inventory = fleet
    done = keeper("down", "-i", str(inventory))
    assert done.returncode == 1 and "not started by this keeper" in done.stderr
    assert queen.alive()


def test_operations_without_the_cluster_token_say_where_it_is_looked_for(fleet, tmp_path, monkeypatch):
    _, inventory = fleet
    monkeypatch.setenv("RBEE_HOME", str(tmp_path / "elsewhere"))
    stop = keeper("worker", "stop", "x", "--hive", "localhost", "-i", str(inventory))
    assert stop.returncode == 1
    assert "cluster token" in stop.stderr and str(tmp_path / "elsewhere" / "secrets" / "cluster.token") in stop.stderr
