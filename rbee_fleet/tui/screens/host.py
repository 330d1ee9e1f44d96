"""One host: devices with usage bars, workers with a tokens/s trend, catalog models, recent operations."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast
from urllib.parse import urlparse

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label, Static

from rbee_fleet.common.errors import ApiError, OperationFailed
from rbee_fleet.contracts.fleet import JobInfo, ModelEntry
from rbee_fleet.keeper.queen_client import QueenUnreachable
from rbee_fleet.tui.format import STATE_STYLES, WORKER_STATE_STYLES, age, size, spark
from rbee_fleet.tui.host_rows import HostRow, HostWorker
from rbee_fleet.tui.snapshot import FleetSnapshot
from rbee_fleet.tui.widgets.operations_bar import OperationsBar
from rbee_fleet.tui.widgets.usage_bar import UsageBar

if TYPE_CHECKING:
    from rbee_fleet.tui.app import KeeperApp

MODELS_REFRESH_S = 10.0
JOBS_REFRESH_S = 3.0
RECENT_JOBS = 8


def worker_cells(w: HostWorker, trend: list[float]) -> list[object]:
    hb = w.view.heartbeat if w.view else None
    sup = w.supervised
    url = hb.url if hb else (sup.url if sup else "")
    port = str(sup.port) if sup else (str(urlparse(url).port or "") if url else "")
    return [
        Text(w.worker_id, style="bold" if w.declared else ""),
        hb.model if hb else (sup.model if sup else "-"),
        hb.backend if hb else (sup.backend if sup else "-"),
        hb.device if hb else (sup.device if sup else "-"),
        port or "-",
        Text(w.state, style=WORKER_STATE_STYLES.get(w.state, "")),
        f"{hb.slots_busy}/{hb.slots_total}" if hb else "-",
        str(hb.queue_depth) if hb else "-",
        f"{hb.tokens_per_second:.1f}" if hb else "-",
        Text(spark(trend), style="cyan"),
    ]


class HostScreen(Screen[None]):
    AUTO_FOCUS = "#workers"
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("w", "spawn", "Spawn worker"),
        Binding("k", "stop_worker", "Stop worker"),
        Binding("m", "download", "Download model"),
        Binding("delete", "delete_model", "Delete model"),
        Binding("a", "host_actions", "Hive…"),
        Binding("l", "log", "Log"),
        Binding("x", "ssh", "ssh", show=False),
    ]

    def __init__(self, alias: str) -> None:
        super().__init__()
        self.alias = alias
        self._device_key: tuple[str, ...] = ()

    @property
    def keeper(self) -> KeeperApp:
        return cast("KeeperApp", self.app)

    def compose(self) -> ComposeResult:
        yield Static("", id="host-title", classes="title")
        with VerticalScroll(id="host-body"):
            yield Label("devices", classes="section")
            yield Vertical(id="devices")
            yield Label("workers", classes="section")
            yield DataTable(id="workers", cursor_type="row", zebra_stripes=True)
            yield Label("models in the catalog", classes="section")
            yield DataTable(id="models", cursor_type="row", zebra_stripes=True)
            yield Label("recent operations", classes="section")
            yield DataTable(id="host-jobs", cursor_type="row", zebra_stripes=True)
        yield OperationsBar(id="ops")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#workers", DataTable).add_columns(
            "worker", "model", "backend", "device", "port", "state", "slots", "queue", "tok/s", "trend")
        self.query_one("#models", DataTable).add_columns("model", "format", "size", "source")
        self.query_one("#host-jobs", DataTable).add_columns("when", "operation", "state", "detail")
        self.watch(self.keeper, "snapshot", self._show, init=True)
        self.keeper.operations_changed.subscribe(self, self._operation_changed)
        self.set_interval(MODELS_REFRESH_S, self.refresh_models)
        self.set_interval(JOBS_REFRESH_S, self.refresh_jobs)
        self.refresh_models()
        self.refresh_jobs()
        self.query_one("#workers", DataTable).focus()

    # -- drawing ---------------------------------------------------------------------------------

    def _show(self, snap: FleetSnapshot) -> None:
        row = snap.row(self.alias)
        title = Text(f"host {self.alias}", style="bold")
        if row is None:
            title.append("  not in the inventory any more", style="red")
            self.query_one("#host-title", Static).update(title)
            return
        title.append(f"  {row.address}  ")
        title.append(row.state.value, style=STATE_STYLES.get(row.state, ""))
        title.append(f"  hive {row.version or '-'}  {row.reason}", style="dim")
        self.query_one("#host-title", Static).update(title)
        self._show_devices(row)
        self._show_workers(row)
        self.query_one(OperationsBar).show([o for o in self.keeper.operations.running() if o.hive == self.alias])

    def _show_devices(self, row: HostRow) -> None:
        box = self.query_one("#devices", Vertical)
        d = row.devices
        if d is None:
            if self._device_key != ("none",):
                self._device_key = ("none",)
                box.remove_children()
                box.mount(Label("no device report (the hive has not sent a heartbeat)", classes="dim"))
            return
        # llama-server's devices (every vendor) where it reports them, else NVML's NVIDIA GPUs.
        bars = [(f"{e.id} {e.description}", (e.memory_total_mb - e.memory_free_mb) / 1024, e.memory_total_mb / 1024)
                for e in d.engine_devices] or [
            (f"GPU{g.index} {g.name}", (g.vram_total_mb - g.vram_free_mb) / 1024, g.vram_total_mb / 1024)
            for g in d.gpus]
        cpu = d.cpu
        bars.append((f"RAM ({cpu.threads} threads)", (cpu.ram_total_mb - cpu.ram_available_mb) / 1024,
                     cpu.ram_total_mb / 1024))
        key = tuple(label for label, _, _ in bars)
        if key != self._device_key:
            self._device_key = key
            box.remove_children()
            box.mount_all([UsageBar(label, used, total) for label, used, total in bars])
            if d.gpu_error:
                box.mount(Label(f"GPU detection: {d.gpu_error}", classes="dim"))
            unusable = [f"{b}: {why}" for b, why in sorted(d.engine_backends.items())
                        if why not in ("ok", "not installed")]
            if unusable:
                box.mount(Label("llama-server backends: " + "; ".join(unusable), classes="dim"))
            return
        for bar, (_, used, total) in zip(box.query(UsageBar), bars):
            bar.set_usage(used, total)

    def _show_workers(self, row: HostRow) -> None:
        table = self.query_one("#workers", DataTable)
        history = self.keeper.sampler.tps
        keys = [w.worker_id for w in row.workers]
        if keys != [k.value for k in table.rows]:
            cursor = table.cursor_row
            table.clear()
            for w in row.workers:
                table.add_row(*worker_cells(w, list(history.get(w.worker_id, []))), key=w.worker_id)
            if keys:
                table.move_cursor(row=min(cursor, len(keys) - 1), animate=False)
            return
        for w in row.workers:
            for col, cell in zip(table.columns, worker_cells(w, list(history.get(w.worker_id, [])))):
                table.update_cell(w.worker_id, col, cell, update_width=True)

    def _show_models(self, models: list[ModelEntry]) -> None:
        table = self.query_one("#models", DataTable)
        table.clear()
        for m in models:
            table.add_row(Text(m.id, style="bold"), m.format, size(m.size_bytes),
                          m.source + (" (built in)" if m.builtin else ""), key=m.id)

    def _show_jobs(self, jobs: list[JobInfo]) -> None:
        table = self.query_one("#host-jobs", DataTable)
        table.clear()
        now = self.keeper.fleet_now()
        mine = [j for j in jobs if j.operation.get("hive") == self.alias]
        local = [o for o in self.keeper.operations if o.hive == self.alias and o.job_id is None]
        rows = [(j.created_at, j.operation.get("kind", "?"), j.state.value, j.error or _op_subject(j.operation))
                for j in mine]
        rows += [(o.started_at, o.kind, o.state, o.error or o.label) for o in local]
        for at, kind, state, detail in sorted(rows, reverse=True)[:RECENT_JOBS]:
            style = {"failed": "red", "succeeded": "green", "running": "cyan"}.get(state, "")
            table.add_row(f"{age(now - at)} ago", kind, Text(state, style=style), detail)

    # -- data ------------------------------------------------------------------------------------

    @work(exclusive=True, group="host-models")
    async def refresh_models(self) -> None:
        fleet = self.keeper.fleet
        if fleet is None or not self.is_current:
            return
        try:
            models = await fleet.models(self.alias)
        except (QueenUnreachable, ApiError, OperationFailed) as exc:
            table = self.query_one("#models", DataTable)
            table.clear()
            table.add_row(Text(f"cannot list models: {exc}", style="red"), "", "", "")
            return
        self._show_models(models)

    @work(exclusive=True, group="host-jobs")
    async def refresh_jobs(self) -> None:
        fleet = self.keeper.fleet
        if fleet is None or not self.is_current:
            return
        try:
            jobs = await fleet.jobs()
        except (QueenUnreachable, ApiError):
            jobs = []
        self._show_jobs(jobs)

    def _operation_changed(self, op: object) -> None:
        if getattr(op, "hive", None) == self.alias and not getattr(op, "running", True):
            self.refresh_models()
            self.refresh_jobs()

    # -- actions ---------------------------------------------------------------------------------

    def _selected(self, table_id: str) -> str | None:
        table = self.query_one(table_id, DataTable)
        if table.row_count == 0:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def action_spawn(self) -> None:
        self.keeper.spawn_worker(self.alias)

    def action_stop_worker(self) -> None:
        worker_id = self._selected("#workers")
        if worker_id is None:
            self.notify("no worker selected", severity="warning")
            return
        self.keeper.stop_worker(worker_id, self.alias)

    def action_download(self) -> None:
        self.keeper.download_model(self.alias)

    def action_delete_model(self) -> None:
        model = self._selected("#models")
        if model is None:
            self.notify("no model selected (move to the models table)", severity="warning")
            return
        self.keeper.delete_model(model, self.alias)

    def action_host_actions(self) -> None:
        self.keeper.host_menu(self.alias)

    def action_log(self) -> None:
        self.keeper.follow_host_log(self.alias)

    def action_ssh(self) -> None:
        self.keeper.ssh(self.alias)


def _op_subject(op: dict[str, object]) -> str:
    for key in ("worker_id", "model", "source"):
        if op.get(key):
            return str(op[key])
    return ""
