"""How the keeper CLI shows things: fleet tables and live job progress."""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TaskID, TextColumn
from rich.table import Table

from rbee_fleet.contracts.fleet import DeviceInfo, FleetStatus, JobEvent, ModelEntry, ModelView, WorkerView

if TYPE_CHECKING:  # a probe reaches hosts over SSH: its module loads only where probes are made
    from rbee_fleet.keeper.hosts.probe import HostProbe


def _cells(*values: object) -> list[str]:
    """Table cells are rich markup: escape what comes from the fleet so brackets show as typed."""
    return [escape(str(v)) for v in values]


def _mb(mb: int) -> str:
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb} MiB"


def devices_summary(d: DeviceInfo) -> str:
    """The CPU and RAM, then each GPU: llama-server's devices (``vulkan:0 llvmpipe 150 MiB/2.0 GiB``) where it
    reports them, else NVML's NVIDIA GPUs."""
    cpu = f"CPU {d.cpu.cores}c/{d.cpu.threads}t, RAM {_mb(d.cpu.ram_total_mb - d.cpu.ram_available_mb)}/{_mb(d.cpu.ram_total_mb)}"
    gpus = [f"{e.id} {e.description} {_mb(e.memory_total_mb - e.memory_free_mb)}/{_mb(e.memory_total_mb)}"
            + (" (unified)" if e.unified else "") for e in d.engine_devices]
    if not gpus:
        gpus = [f"{g.name} {_mb(g.vram_total_mb - g.vram_free_mb)}/{_mb(g.vram_total_mb)}" for g in d.gpus]
    return "; ".join([cpu, *gpus])


def worker_state(w: WorkerView) -> str:
    return w.heartbeat.state.value if w.live else f"lost ({w.last_seen_s:.0f}s)"


def status_tables(status: FleetStatus, probes: Mapping[str, HostProbe] | None = None) -> list[Table]:
    """The queen, its hives and its workers; ``probes`` (what SSH found on inventory hosts the queen has no live
    hive of) win over the queen's memory of such a hive, and add the hosts it never heard of."""
    q = status.queen
    head = Table.grid(padding=(0, 2))
    head.add_row("[bold]queen[/]", *_cells(q.url, f"v{q.version}", f"up {q.uptime_s:.0f}s",
                 f"{q.requests_total} requests", f"{q.in_flight} in flight",
                 f"models: {', '.join(status.models) or 'none'}"))
    hives = Table(title="hives", title_justify="left", expand=False)
    for col in ("hive", "url", "state", "version", "devices", "workers"):
        hives.add_column(col)
    probes = probes or {}
    for h in status.hives:
        state = "embedded" if h.embedded else ("up" if h.live else "unreachable")
        probe = probes.get(h.hive_id) if not h.live else None
        if probe is not None:
            hives.add_row(*_cells(h.hive_id, h.url, probe_state(probe), probe.version or "-", "-", "-"))
            continue
        hives.add_row(*_cells(h.hive_id, h.url, state, h.version, devices_summary(h.devices), len(h.workers)))
    known = {h.hive_id for h in status.hives}
    for alias, probe in probes.items():
        if alias not in known:
            hives.add_row(*_cells(alias, "-", probe_state(probe), probe.version or "-", "-", "-"))
    workers = Table(title="workers", title_justify="left", expand=False)
    gpu = any(w.heartbeat.cache_tokens_total is not None or w.heartbeat.vram_used_mb is not None
              for w in status.workers)
    for col in ("worker", "model", "backend", "device", "url", "state", "busy/slots", "queue", "tok/s",
                *(("cache free", "VRAM") if gpu else ())):
        workers.add_column(col)
    for w in status.workers:
        hb = w.heartbeat
        cells = [hb.worker_id, hb.model, hb.backend, hb.device, hb.url, worker_state(w),
                 f"{w.in_flight}/{hb.slots_total}", hb.queue_depth, f"{hb.tokens_per_second:.1f}"]
        if gpu:
            cache = (f"{hb.cache_tokens_free}/{hb.cache_tokens_total} tok" if hb.cache_tokens_total is not None else "")
            layers = f" ({hb.gpu_layers}/{hb.model_layers} layers)" if hb.model_layers else ""
            cells += [cache, (_mb(hb.vram_used_mb) + layers) if hb.vram_used_mb is not None else ""]
        workers.add_row(*_cells(*cells))
    return [head, hives, workers]


def probe_state(probe: HostProbe) -> str:
    """A probed host's state cell: ``not installed``, ``stopped``, or why SSH could not tell."""
    if probe.state in ("not installed", "stopped"):
        return probe.state
    if probe.state == "running":
        return "running, no heartbeat"
    return f"{probe.state} ({probe.reason})"


def models_table(hive: str, models: list[ModelEntry]) -> Table:
    table = Table(title=f"models on {hive}", title_justify="left")
    for col in ("model", "format", "size", "source", "path"):
        table.add_column(col)
    for m in models:
        table.add_row(*_cells(m.id, m.format, f"{m.size_bytes / 2**20:.1f} MiB", m.source, m.path))
    return table


def fleet_models_table(models: list[ModelView]) -> Table:
    """Every model of the fleet: loaded (on how many workers), loading, or available to load on demand."""
    table = Table(title="models", title_justify="left")
    for col in ("model", "state", "workers", "hives", "format", "size", "need", "capabilities"):
        table.add_column(col)
    for m in models:
        table.add_row(*_cells(m.id, m.state, m.workers, ", ".join(m.hives) or "-", m.format or "-",
                              f"{m.size_bytes / 2**20:.1f} MiB" if m.size_bytes else "-",
                              f"~{_mb(m.need_mb)}" if m.need_mb else "-", ", ".join(m.capabilities)))
    return table


class JobReporter:
    """Shows job events: live bars on a terminal, one plain line per step otherwise (CI logs)."""

    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self.live = console.is_terminal and not quiet
        self._progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.fields[label]}[/] {task.description}"),
            BarColumn(), DownloadColumn(), console=console, transient=False,
        ) if self.live else None
        self._tasks: dict[str, TaskID] = {}
        self._last_line: dict[str, float] = {}

    def __enter__(self) -> JobReporter:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, label: str, event: JobEvent) -> None:
        if self.quiet:
            return
        if self._progress is None:
            self._plain(label, event)
            return
        task = self._tasks.get(label)
        if task is None:
            task = self._progress.add_task(escape(event.message), label=escape(label), total=None)
            self._tasks[label] = task
        prog = event.progress
        fields: dict[str, object] = {"description": escape(event.message)}
        if prog is not None and prog.unit == "bytes":
            fields.update(completed=prog.current, total=prog.total)
        if event.type == "result":
            fields.update(description="[green]done[/]")
            self._finish(task)
        elif event.type in ("error", "cancelled"):
            fields.update(description=f"[red]{escape(event.message)}[/]")
            self._finish(task)
        self._progress.update(task, **fields)

    def _finish(self, task: TaskID) -> None:
        assert self._progress is not None
        t = self._progress.tasks[task]
        self._progress.update(task, total=t.total or 1, completed=t.total or 1)

    def _plain(self, label: str, event: JobEvent) -> None:
        now = time.monotonic()
        prog = event.progress
        if event.type == "progress" and prog is not None and prog.unit == "bytes":
            if now - self._last_line.get(label, 0.0) < 2.0:
                return
            pct = f" {100 * prog.current / prog.total:.0f}%" if prog.total else ""
            message = f"{event.message}{pct} ({prog.current / 2**20:.1f} MiB)"
        elif event.type == "result":
            message = "done"
        else:
            message = event.message
        self._last_line[label] = now
        self.console.print(f"[bold]{escape(label)}[/]: {escape(message)}", highlight=False)
