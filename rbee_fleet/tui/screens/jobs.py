"""Jobs and logs: every operation (this session's and the queen's) with its live event stream, a host's log
followed as it is written, and the audit log (who changed the fleet, when, with what result)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label, Select, TabbedContent, TabPane

from rbee_fleet.common.errors import ApiError, OperationFailed
from rbee_fleet.contracts.fleet import JobInfo
from rbee_fleet.keeper.queen_client import QueenUnreachable
from rbee_fleet.tui.format import age
from rbee_fleet.tui.operations import TrackedOperation
from rbee_fleet.tui.screens.confirm import ConfirmScreen
from rbee_fleet.tui.widgets.job_log import JobLog

if TYPE_CHECKING:
    from rbee_fleet.tui.app import KeeperApp

JOBS_REFRESH_S = 2.0
STATE_STYLES = {"failed": "red", "succeeded": "green", "running": "cyan", "cancelled": "yellow"}
AUDIT_STYLES = {"failed": "red", "ok": "green", "cancelled": "yellow"}
AUDIT_ROWS = 200  # the newest audit entries shown


class JobsScreen(Screen[None]):
    AUTO_FOCUS = "#ops-table"
    BINDINGS = [
        Binding("c", "cancel", "Cancel job"),
        Binding("t", "toggle_tab", "Ops/Log/Audit tab"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.selected: str | None = None  # row key: "op-N" or "job-ID"
        self._shown_events = 0
        self._queen_jobs: list[JobInfo] = []

    @property
    def keeper(self) -> KeeperApp:
        return cast("KeeperApp", self.app)

    def compose(self) -> ComposeResult:
        with TabbedContent(id="tabs"):
            with TabPane("operations", id="tab-ops"):
                with Horizontal():
                    yield DataTable(id="ops-table", cursor_type="row", zebra_stripes=True)
                    with Vertical(id="ops-detail"):
                        yield Label("select an operation", id="ops-title", classes="section")
                        yield JobLog(id="ops-log")
            with TabPane("host log", id="tab-log"):
                yield Select[str]([], prompt="pick a host", id="log-host")
                yield JobLog(clock=False, id="host-log")
            with TabPane("audit", id="tab-audit"):
                yield DataTable(id="audit-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#ops-table", DataTable).add_columns("age", "operation", "host", "state", "last")
        self.query_one("#audit-table", DataTable).add_columns("when (UTC)", "who", "action", "targets", "result", "reason")
        self.keeper.operations_changed.subscribe(self, self._operation_changed)
        self.watch(self.keeper, "snapshot", lambda _: self._hosts_changed(), init=True)
        self.set_interval(JOBS_REFRESH_S, self.refresh_jobs)
        self.refresh_jobs()

    def on_screen_resume(self) -> None:
        self.refresh_jobs()

    # -- the operations table -------------------------------------------------------------------

    @work(exclusive=True, group="jobs-list")
    async def refresh_jobs(self) -> None:
        fleet = self.keeper.fleet
        if fleet is not None and self.is_current:
            try:
                self._queen_jobs = await fleet.jobs()
            except (QueenUnreachable, ApiError):
                pass
        self._draw_table()
        self._draw_audit()

    def _draw_audit(self) -> None:
        """The newest audit entries first (``$RBEE_HOME/audit.jsonl``, what ``rbee-keeper audit`` shows)."""
        fleet = self.keeper.fleet
        if fleet is None:
            return
        entries = fleet.changes.audit.read(limit=AUDIT_ROWS)
        table = self.query_one("#audit-table", DataTable)
        if len(entries) == table.row_count and getattr(self, "_audit_last", None) == (entries[-1].ts if entries else None):
            return
        self._audit_last = entries[-1].ts if entries else None
        table.clear()
        for e in reversed(entries):
            result = e.result + (f" ({e.exit_code})" if e.exit_code is not None else "")
            table.add_row(e.ts.replace("T", " ").removesuffix("Z"), e.who, e.action, ", ".join(e.targets)[:40],
                          Text(result, style=AUDIT_STYLES.get(e.result, "")), e.reason[:80])

    def _rows(self) -> list[tuple[float, str, list[object]]]:
        now = self.keeper.fleet_now()
        rows: list[tuple[float, str, list[object]]] = []
        tracked = set()
        for op in self.keeper.operations:
            if op.job_id:
                tracked.add(op.job_id)
            rows.append((op.started_at, f"op-{op.op_id}", [
                age(now - op.started_at), op.label, op.hive or "-",
                Text(op.state, style=STATE_STYLES.get(op.state, "")), op.last_message[:60]]))
        for j in self._queen_jobs:
            if j.job_id in tracked:
                continue
            kind = str(j.operation.get("kind", "?"))
            rows.append((j.created_at, f"job-{j.job_id}", [
                age(now - j.created_at), f"{kind} {j.job_id[:8]}", str(j.operation.get("hive", "-")),
                Text(j.state.value, style=STATE_STYLES.get(j.state.value, "")), (j.error or "")[:60]]))
        return sorted(rows, key=lambda r: r[0], reverse=True)

    def _draw_table(self) -> None:
        table = self.query_one("#ops-table", DataTable)
        rows = self._rows()
        keys = [k for _, k, _ in rows]
        if keys != [k.value for k in table.rows]:
            selected = self.selected
            table.clear()
            for _, key, cells in rows:
                table.add_row(*cells, key=key)
            if selected in keys:
                table.move_cursor(row=keys.index(selected), animate=False)
            return
        for _, key, cells in rows:
            for col, cell in zip(table.columns, cells):
                table.update_cell(key, col, cell, update_width=True)

    @on(DataTable.RowHighlighted, "#ops-table")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value
        if key is not None and key != self.selected:
            self.show_operation(key)

    def show_operation(self, key: str) -> None:
        self.selected = key
        log = self.query_one("#ops-log", JobLog)
        log.clear()
        self._shown_events = 0
        if key.startswith("op-"):
            self.workers.cancel_group(self, "job-follow")
            op = self.keeper.operations.get(int(key[3:]))
            if op is not None:
                self.query_one("#ops-title", Label).update(f"{op.label} ({op.kind}{f', job {op.job_id}' if op.job_id else ''})")
                self._append_events(op)
        else:
            job_id = key[4:]
            self.query_one("#ops-title", Label).update(f"queen job {job_id}")
            self.follow_job(job_id)

    def _append_events(self, op: TrackedOperation) -> None:
        log = self.query_one("#ops-log", JobLog)
        for event in op.events[self._shown_events:]:
            log.add_event(event)
        self._shown_events = len(op.events)
        if not op.running and op.error and not any(e.type == "error" for e in op.events):
            log.add_line(f"failed: {op.error}", style="bold red")

    @work(exclusive=True, group="job-follow")
    async def follow_job(self, job_id: str) -> None:
        log = self.query_one("#ops-log", JobLog)
        fleet = self.keeper.fleet
        if fleet is None:
            return
        try:
            async for event in fleet.job_events(job_id):
                log.add_event(event)
        except (QueenUnreachable, ApiError, OperationFailed, OSError) as exc:
            log.add_line(f"cannot follow job {job_id}: {exc}", style="red")

    def _operation_changed(self, op: TrackedOperation) -> None:
        if self.selected == f"op-{op.op_id}":
            self._append_events(op)
        self._draw_table()

    def action_cancel(self) -> None:
        key = self.selected
        if key is None:
            self.notify("no operation selected", severity="warning")
            return
        self._cancel(key)

    @work(group="dialogs")
    async def _cancel(self, key: str) -> None:
        if key.startswith("op-"):
            op = self.keeper.operations.get(int(key[3:]))
            if op is None or not op.running:
                self.notify("that operation is not running", severity="warning")
                return
            if await self.app.push_screen_wait(ConfirmScreen(f"Cancel {op.label}?", yes="Cancel it")):
                op.worker.cancel()
            return
        job_id = key[4:]
        job = next((j for j in self._queen_jobs if j.job_id == job_id), None)
        if job is None or job.state.value != "running":
            self.notify("that job is not running", severity="warning")
            return
        if await self.app.push_screen_wait(ConfirmScreen(f"Cancel queen job {job_id}?", yes="Cancel it")):
            try:
                await self.keeper.fleet.cancel_job(job_id)  # type: ignore[union-attr]
            except (QueenUnreachable, ApiError) as exc:
                self.notify(f"cancel failed: {exc}", severity="error")

    # -- the host log tab -------------------------------------------------------------------------

    def _hosts_changed(self) -> None:
        select = self.query_one("#log-host", Select)
        hosts = [r.alias for r in self.keeper.snapshot.rows]
        if hosts != getattr(self, "_log_hosts", None):
            self._log_hosts = hosts
            current = select.value
            select.set_options([(h, h) for h in hosts])
            if current in hosts:
                select.value = current

    def show_host_log(self, alias: str) -> None:
        self.query_one("#tabs", TabbedContent).active = "tab-log"
        select = self.query_one("#log-host", Select)
        if select.value != alias:
            select.value = alias  # the Changed handler starts following
        else:
            self.follow_log(alias)

    @on(Select.Changed, "#log-host")
    def _log_host_changed(self, event: Select.Changed) -> None:
        if event.value is not Select.NULL:
            self.follow_log(str(event.value))

    @work(exclusive=True, group="host-log")
    async def follow_log(self, alias: str) -> None:
        log = self.query_one("#host-log", JobLog)
        log.clear()
        hosts = self.keeper.hosts
        if hosts is None:
            log.add_line("no inventory loaded", style="red")
            return
        log.add_line(f"── log of {alias} ──", style="bold")
        try:
            async for line in hosts.follow_log(alias):
                log.add_line(line)
        except OperationFailed as exc:
            log.add_line(str(exc), style="red")

    def action_toggle_tab(self) -> None:
        tabs = self.query_one("#tabs", TabbedContent)
        order = ["tab-ops", "tab-log", "tab-audit"]
        tabs.active = order[(order.index(tabs.active) + 1) % len(order)] if tabs.active in order else "tab-ops"
