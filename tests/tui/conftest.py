"""Fixtures for the TUI tests: a real queen with a real llama.cpp worker, and helpers to drive the app."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from tests.support import procs


@dataclass
class LiveFleet:
    queen: procs.Proc
    inventory: Path
    home: Path
    port: int


@pytest.fixture(scope="module")
def live_fleet(module_tmp: Path) -> Iterator[LiveFleet]:
    """A real queen (embedded hive) serving smollm2 with one real worker, on free loopback ports."""
    port = procs.free_port()
    base = procs.free_port_range(8)
    home = module_tmp / "queen-home"
    inventory = procs.write_inventory(module_tmp / "fleet.toml", port=port, worker_port_base=base,
                                      workers=[{"model": "smollm2", "threads": 1, "ctx_size": 512}])
    queen = procs.start_queen(module_tmp, inventory, home, port)
    try:
        procs.wait_workers_ready(queen, 1)
        yield LiveFleet(queen, inventory, home, port)
    finally:
        queen.stop()


@pytest.fixture(autouse=True)
def _keeper_shares_the_queens_home(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a real operator machine, the TUI and the queen it talks to share RBEE_HOME (and its token)."""
    if "live_fleet" in request.fixturenames:
        monkeypatch.setenv("RBEE_HOME", str(request.getfixturevalue("live_fleet").home))


async def wait_for(pilot: Pilot, predicate: Callable[[], Any], timeout: float = 30.0, what: str = "the TUI") -> Any:
    """Let the app run until ``predicate()`` is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await pilot.pause(0.1)


def notifications(app: Any) -> list[str]:
    """The messages of the toasts the app has shown (and not yet dismissed)."""
    return [n.message for n in app._notifications]
