"""SVG snapshots of the TUI's main screens at fixed terminal sizes.

The queen's answers come from ``StandInQueenService`` (fixed status, times and pids) and what SSH finds on
the remote hosts from ``StandInHostService``, so the pictures are stable; cursor blinking is off and the
clock is UTC. Update after an intended change with
``pytest tests/tui/test_tui_snapshots.py --snapshot-update`` and review the SVGs in the diff.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Input

from rbee_fleet.keeper.queen_client import QueenUnreachable
from rbee_fleet.tui.app import KeeperApp
from tests.tui.standin import StandInHostService, StandInQueenService, write_inventory

WIDE = (120, 34)
SMALL = (80, 24)


class QueenDownStandIn(StandInQueenService):
    """Stand-in for a queen that refuses connections (fixed wording, no real port in the picture)."""

    async def status(self):
        raise QueenUnreachable(self.queen_url, "Cannot connect to host: Connect call failed")


@pytest.fixture
def app_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., KeeperApp]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    write_inventory(tmp_path / "fleet.toml")

    def make(service=StandInQueenService) -> KeeperApp:
        # One poll only (at start), so histories and rates do not depend on timing.
        return KeeperApp("fleet.toml", refresh_s=3600, service_factory=service, actions_factory=StandInHostService)

    yield make
    monkeypatch.delenv("TZ")
    time.tzset()


async def until(pilot: Pilot, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the screen did not reach the expected state")
        await pilot.pause(0.05)


async def still(pilot: Pilot) -> None:
    """No blinking cursor, nothing half drawn."""
    for box in pilot.app.screen.query(Input):
        box.cursor_blink = False
    await pilot.pause(0.2)


def polled(pilot: Pilot, probed: tuple[str, ...] = ("old-laptop",)) -> bool:
    """The first poll has answered and the hosts the queen knows nothing of have been probed."""
    app = pilot.app
    return app.snapshot.polled and not app.probes.running and set(probed) <= set(app.probes.results)  # type: ignore[attr-defined]


def test_fleet_screen(snap_compare, app_factory):
    async def run_before(pilot: Pilot) -> None:
        await until(pilot, lambda: polled(pilot) and pilot.app.screen.query_one(DataTable).row_count == 3)
        await still(pilot)

    assert snap_compare(app_factory(), terminal_size=WIDE, run_before=run_before)


def test_fleet_screen_at_80x24(snap_compare, app_factory):
    async def run_before(pilot: Pilot) -> None:
        await until(pilot, lambda: polled(pilot) and pilot.app.screen.query_one(DataTable).row_count == 3)
        await still(pilot)

    assert snap_compare(app_factory(), terminal_size=SMALL, run_before=run_before)


def test_fleet_screen_with_the_queen_down(snap_compare, app_factory):
    async def run_before(pilot: Pilot) -> None:
        await until(pilot, lambda: polled(pilot, ("gpu-box", "old-laptop")))
        await still(pilot)

    assert snap_compare(app_factory(QueenDownStandIn), terminal_size=SMALL, run_before=run_before)


def test_host_detail_screen(snap_compare, app_factory):
    async def run_before(pilot: Pilot) -> None:
        await until(pilot, lambda: polled(pilot) and pilot.app.screen.query_one(DataTable).row_count == 3)
        await pilot.press("enter")  # gpu-box, first when sorted by alias
        await until(pilot, lambda: pilot.app.screen.query_one("#models", DataTable).row_count == 2
                    and pilot.app.screen.query_one("#host-jobs", DataTable).row_count == 2)
        await still(pilot)

    assert snap_compare(app_factory(), terminal_size=(120, 40), run_before=run_before)


def test_jobs_screen(snap_compare, app_factory):
    async def run_before(pilot: Pilot) -> None:
        await until(pilot, lambda: polled(pilot))
        await pilot.press("f2")
        await until(pilot, lambda: pilot.app.screen.query_one("#ops-table", DataTable).row_count == 2)
        await pilot.press("down")  # the older job, the download, with its progress event
        await until(pilot, lambda: len(pilot.app.screen.query_one("#ops-log").lines) >= 3)
        await still(pilot)

    assert snap_compare(app_factory(), terminal_size=WIDE, run_before=run_before)


def test_inventory_screen(snap_compare, app_factory):
    async def run_before(pilot: Pilot) -> None:
        await until(pilot, lambda: polled(pilot))
        await pilot.press("f4", "down")
        await still(pilot)

    assert snap_compare(app_factory(), terminal_size=WIDE, run_before=run_before)


def test_deploy_plan(snap_compare, app_factory):
    async def run_before(pilot: Pilot) -> None:
        await until(pilot, lambda: polled(pilot))
        await pilot.press("D")
        await until(pilot, lambda: pilot.app.screen.query("#plan"))
        pilot.app.clear_notifications()  # "checking … over SSH" goes after 3 s: not in the picture
        await still(pilot)

    assert snap_compare(app_factory(), terminal_size=WIDE, run_before=run_before)


def test_chat_screen(snap_compare, app_factory):
    async def run_before(pilot: Pilot) -> None:
        await until(pilot, lambda: polled(pilot))
        await pilot.press("f3")
        await still(pilot)

    assert snap_compare(app_factory(), terminal_size=SMALL, run_before=run_before)


def test_help(snap_compare, app_factory):
    async def run_before(pilot: Pilot) -> None:
        await until(pilot, lambda: polled(pilot))
        await pilot.press("question_mark")
        await still(pilot)

    assert snap_compare(app_factory(), terminal_size=(100, 40), run_before=run_before)


def test_host_detail_screen_at_80x24(snap_compare, app_factory):
    async def run_before(pilot: Pilot) -> None:
        await until(pilot, lambda: polled(pilot) and pilot.app.screen.query_one(DataTable).row_count == 3)
        await pilot.press("enter")
        await until(pilot, lambda: pilot.app.screen.query_one("#models", DataTable).row_count == 2)
        await still(pilot)

    assert snap_compare(app_factory(), terminal_size=SMALL, run_before=run_before)


def test_spawn_form_at_80x24(snap_compare, app_factory):
    async def run_before(pilot: Pilot) -> None:
        await until(pilot, lambda: polled(pilot))
        await pilot.press("w")
        await until(pilot, lambda: pilot.app.screen.query("#field-model"))
        await still(pilot)

    assert snap_compare(app_factory(), terminal_size=SMALL, run_before=run_before)
