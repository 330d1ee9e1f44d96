"""The TUI driven by Textual's Pilot against a real queen and real llama.cpp workers (no stand-in fleet)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, Label, Select, Static

from rbee_fleet import __version__
from rbee_fleet.common.inventory import load_inventory
from rbee_fleet.tui.app import KeeperApp
from rbee_fleet.tui.host_rows import HostState
from rbee_fleet.tui.screens.confirm import ConfirmScreen
from rbee_fleet.tui.screens.diff import DiffScreen
from rbee_fleet.tui.screens.form import FormScreen
from rbee_fleet.tui.screens.host import HostScreen
from rbee_fleet.tui.screens.jobs import JobsScreen
from rbee_fleet.tui.widgets.fleet_table import FleetTable
from rbee_fleet.tui.widgets.job_log import JobLog
from tests.support import procs
from tests.tui.conftest import LiveFleet, notifications, wait_for

pytestmark = pytest.mark.slow

SIZE = (120, 36)


def text(widget: Static) -> str:
    return str(widget.content)


async def fill(pilot, field: str, value: str) -> None:
    """Type into a form field the way an operator does: focus it, clear it, type."""
    box = pilot.app.screen.query_one(f"#field-{field}", Input)
    box.focus()
    box.value = ""
    await pilot.press(*value)


def worker_state(app: KeeperApp, worker_id: str) -> str | None:
    row = app.snapshot.row("localhost")
    found = [w for w in row.workers if w.worker_id == worker_id] if row else []
    return found[0].state if found else None


async def test_fleet_table_fills_in_from_the_queen(live_fleet: LiveFleet):
    app = KeeperApp(str(live_fleet.inventory), refresh_s=0.5)
    async with app.run_test(size=SIZE) as pilot:
        table = app.screen.query_one(FleetTable)
        await wait_for(pilot, lambda: table.row_count == 1 and app.snapshot.status is not None, what="the fleet table")
        row = app.snapshot.row("localhost")
        assert row is not None and row.state is HostState.UP, row
        assert row.running == 1 and row.version == __version__
        assert row.devices is not None and row.devices.cpu.threads >= 1
        cells = [str(c) for c in table.get_row("localhost")]
        assert cells[:4] == ["localhost", "127.0.0.1", "up", __version__]
        assert cells[5] == "1/1"
        header = text(app.screen.query_one("#queen", Static))
        assert live_fleet.queen.url in header and "smollm2" in header and f"v{__version__}" in header
        # Live: the queen's uptime moves on without a key being pressed.
        first = app.snapshot.status.queen.uptime_s
        await wait_for(pilot, lambda: app.snapshot.status and app.snapshot.status.queen.uptime_s > first + 0.5,
                       what="a later poll")


async def test_worker_spawned_from_the_tui_appears_and_stops_after_confirmation(live_fleet: LiveFleet):
    app = KeeperApp(str(live_fleet.inventory), refresh_s=0.5)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.snapshot.status is not None, what="the first poll")
        await pilot.press("w")
        await wait_for(pilot, lambda: isinstance(app.screen, FormScreen), what="the spawn form")
        assert app.screen.query_one("#field-model", Input).has_focus  # the first empty field
        await fill(pilot, "model", "smollm2")
        await fill(pilot, "worker_id", "tui-spawned")
        await fill(pilot, "ctx_size", "512")
        await fill(pilot, "threads", "1")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, FormScreen), what="the form to close")
        op = app.operations.get(1)
        assert op is not None and op.kind == "worker_spawn" and op.hive == "localhost"
        await wait_for(pilot, lambda: worker_state(app, "tui-spawned") == "ready", timeout=90,
                       what="the spawned worker to be ready")
        assert op.state == "succeeded" and op.job_id and any(e.type == "progress" for e in op.events)

        # It shows on the host screen with its slots and port.
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, HostScreen), what="the host screen")
        workers = app.screen.query_one("#workers", DataTable)
        await wait_for(pilot, lambda: "tui-spawned" in [k.value for k in workers.rows], what="the worker row")
        cells = [str(c) for c in workers.get_row("tui-spawned")]
        assert cells[1:4] == ["smollm2", "llamacpp", "cpu"] and cells[5] == "ready" and cells[6] == "0/4"  # llama-server's 4 slots

        # Stopping asks first; "n" leaves it running, "y" stops it.
        workers.move_cursor(row=workers.get_row_index("tui-spawned"))
        await pilot.press("k")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        await pilot.press("n")
        await pilot.pause(0.5)
        assert len(app.operations) == 1 and worker_state(app, "tui-spawned") == "ready"
        await pilot.press("k")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: worker_state(app, "tui-spawned") is None, timeout=60,
                       what="the worker to leave the fleet")
        stop = app.operations.get(2)
        assert stop is not None and stop.kind == "worker_stop" and stop.state == "succeeded"


async def test_chat_answer_streams_through_the_queen(live_fleet: LiveFleet, monkeypatch: pytest.MonkeyPatch):
    # Every text the answer's bubble is given, however fast the chunks come (a poll can miss a short answer).
    shown: list[str] = []
    # The stats line as it reads at each update, with how much of the answer was on screen then.
    stats_seen: list[tuple[str, str]] = []
    update = Static.update

    def record(widget: Static, content: object = "", *args: object, **kwargs: object) -> None:
        if widget.has_class("msg-smollm2"):
            shown.append(getattr(content, "plain", str(content)))
        if widget.id == "chat-stats":
            stats_seen.append((getattr(content, "plain", str(content)), shown[-1] if shown else ""))
        update(widget, content, *args, **kwargs)

    monkeypatch.setattr(Static, "update", record)
    app = KeeperApp(str(live_fleet.inventory), refresh_s=0.5)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        select = app.screen.query_one("#chat-model", Select)
        await wait_for(pilot, lambda: select.value == "smollm2", what="the model list")
        await pilot.press(*"Write a short story about a bee.", "enter")
        stats = app.screen.query_one("#chat-stats", Static)
        summary = r"\d+ tokens, first token after \d+ ms, [\d.]+ tokens/s$"  # once the stream has ended
        await wait_for(pilot, lambda: re.search(summary, text(stats)), timeout=60, what="the answer")
        answer = text(list(app.screen.query(".msg-smollm2"))[-1]).removeprefix("smollm2: ")
        assert answer.strip() and answer != "…"
        # Streamed: the bubble showed the answer growing, in partial states, before it was complete.
        partial = [s for s in shown if s not in ("smollm2: …", f"smollm2: {answer}")]
        assert partial and all(f"smollm2: {answer}".startswith(s) for s in partial), shown
        assert re.search(r"\d+ tokens, first token after \d+ ms, [\d.]+ tokens/s", text(stats)), text(stats)
        # Mid-stream, the line showed the first token's time as soon as it came, then a running rate, while
        # the answer was still incomplete (not "waiting for the first token…" until the end).
        live = [(line, on_screen) for line, on_screen in stats_seen
                if on_screen not in ("", "smollm2: …", f"smollm2: {answer}")]
        assert live and re.fullmatch(r"first token after \d+ ms", live[0][0]), stats_seen
        assert any(re.fullmatch(r"first token after \d+ ms, \d+ tokens, [\d.]+ tokens/s so far", line)
                   for line, _ in live), stats_seen
        assert [m["role"] for m in app.screen.messages] == ["user", "assistant"]


async def test_failing_action_shows_its_reason(live_fleet: LiveFleet):
    app = KeeperApp(str(live_fleet.inventory), refresh_s=0.5)
    async with app.run_test(size=(80, 24)) as pilot:  # the smallest terminal the TUI is made for
        await wait_for(pilot, lambda: app.snapshot.status is not None, what="the first poll")
        await pilot.press("w")
        await wait_for(pilot, lambda: isinstance(app.screen, FormScreen), what="the spawn form")
        await fill(pilot, "model", "no-such-model")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: any("no-such-model" in n and "failed" in n for n in notifications(app)),
                       what="the failure notification")
        message = next(n for n in notifications(app) if "no-such-model" in n)
        assert "no model 'no-such-model'" in message, message
        op = app.operations.get(1)
        assert op.state == "failed" and "no model 'no-such-model'" in (op.error or "")
        # The Jobs screen keeps it, with the error event from the queen's job stream.
        await pilot.press("f2")
        screen = app.screen
        assert isinstance(screen, JobsScreen)
        table = screen.query_one("#ops-table", DataTable)
        await wait_for(pilot, lambda: "op-1" in [k.value for k in table.rows], what="the operation row")
        table.move_cursor(row=table.get_row_index("op-1"))
        screen.show_operation("op-1")
        log = screen.query_one("#ops-log", JobLog)
        await wait_for(pilot, lambda: any("no-such-model" in line.text for line in log.lines), what="the error in the log")


async def test_download_with_progress_then_delete(live_fleet: LiveFleet, tmp_path: Path):
    model = tmp_path / "tiny-test.gguf"
    model.write_bytes(b"GGUF" + bytes(6 * 2**20))  # not loadable, but a catalog entry all the same
    app = KeeperApp(str(live_fleet.inventory), refresh_s=0.5)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.snapshot.status is not None, what="the first poll")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, HostScreen), what="the host screen")
        await pilot.press("m")
        await wait_for(pilot, lambda: isinstance(app.screen, FormScreen), what="the download form")
        await fill(pilot, "source", str(model))
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, HostScreen), what="the form to close")
        models = app.screen.query_one("#models", DataTable)
        await wait_for(pilot, lambda: "tiny-test" in [k.value for k in models.rows], what="the model in the catalog")
        op = app.operations.get(1)
        assert op.state == "succeeded"
        byte_progress = [e.progress for e in op.events if e.progress is not None and e.progress.unit == "bytes"]
        assert byte_progress and byte_progress[-1].current == byte_progress[-1].total == model.stat().st_size

        models.focus()
        models.move_cursor(row=models.get_row_index("tiny-test"))
        await pilot.press("delete")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: "tiny-test" not in [k.value for k in models.rows], timeout=30,
                       what="the model to leave the catalog")
        assert app.operations.get(2).state == "succeeded"

        # Both operations are in the audit log, shown on the Jobs screen's audit tab, newest first.
        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, JobsScreen), what="the jobs screen")
        await pilot.press("t", "t")
        audit = app.screen.query_one("#audit-table", DataTable)
        await wait_for(pilot, lambda: audit.row_count >= 2, what="the audit entries")
        rows = [[str(c) for c in audit.get_row_at(i)] for i in range(2)]
        assert [r[2] for r in rows] == ["model delete", "model download"], rows
        assert rows[0][3] == "localhost/tiny-test" and rows[0][4] == "ok"
        assert rows[1][3] == f"localhost/{model}"[:40]


async def test_inventory_edit_is_written_back_and_read_again(live_fleet: LiveFleet, tmp_path: Path):
    path = tmp_path / "fleet.toml"
    shutil.copy(live_fleet.inventory, path)
    app = KeeperApp(str(path), refresh_s=0.5)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.snapshot.status is not None, what="the first poll")
        await pilot.press("f4", "a")
        await wait_for(pilot, lambda: isinstance(app.screen, FormScreen), what="the host form")
        await fill(pilot, "alias", "gpu-box")
        await fill(pilot, "address", "127.0.0.1")  # loopback, and an SSH port where nothing listens
        await fill(pilot, "ssh_port", str(closed_ssh_port := procs.free_port()))
        await fill(pilot, "ssh_user", "bee")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, FormScreen), what="the form to close")
        hosts = app.screen.query_one("#inv-hosts", DataTable)
        assert [k.value for k in hosts.rows] == ["localhost", "gpu-box"]
        hosts.move_cursor(row=1)

        # A bad value is refused in the form, next to its field, and nothing is lost.
        await pilot.press("w")
        await wait_for(pilot, lambda: isinstance(app.screen, FormScreen), what="the worker form")
        await fill(pilot, "model", "smollm2")
        await fill(pilot, "device", "gpu0")
        await pilot.press("ctrl+s")
        error = app.screen.query_one("#error-device", Label)
        await wait_for(pilot, lambda: "cuda:N" in str(error.content), what="the device error")
        assert isinstance(app.screen, FormScreen)
        await fill(pilot, "device", "cuda:0")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, FormScreen), what="the form to close")

        # Saving shows the diff first.
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, DiffScreen), what="the diff")
        diff = app.screen.diff
        assert "+[hives.gpu-box]" in diff and '+ssh_user = "bee"' in diff and "cuda:0" in diff
        await pilot.press("y")
        await wait_for(pilot, lambda: not isinstance(app.screen, DiffScreen), what="the save")

        inv = load_inventory(path)
        gpu = inv.hives["gpu-box"]
        assert (gpu.address, gpu.ssh_port, gpu.ssh_user) == ("127.0.0.1", closed_ssh_port, "bee")
        assert [(w.model, w.device) for w in gpu.workers] == [("smollm2", "cuda:0")]
        # Keys no form knows survive: the queen's port and heartbeat settings, the local worker's threads.
        assert inv.queen.port == live_fleet.port and inv.queen.heartbeat_interval_s == 0.5
        assert inv.hives["localhost"].workers[0].threads == 1
        # The app re-read the file: the new host is on the fleet screen, the queen knows nothing of it, and the
        # SSH probe says why its state cannot be read.
        await wait_for(pilot, lambda: app.snapshot.row("gpu-box") is not None
                       and app.snapshot.row("gpu-box").state is HostState.UNREACHABLE, what="the new host, probed")
        assert f"ssh: connection refused by bee@127.0.0.1:{closed_ssh_port}" == app.snapshot.row("gpu-box").reason
