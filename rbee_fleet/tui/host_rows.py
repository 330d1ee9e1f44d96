"""The fleet per inventory host: the inventory's declarations joined with what the queen reports, and,
for remote hosts the queen has no live hive of, what an SSH probe found (``HostProbe``).

Pure functions over ``Inventory``, ``FleetStatus`` and probes, so the TUI and tests share one definition
of a host's state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from rbee_fleet.common.inventory import HiveDecl, Inventory
from rbee_fleet.contracts.fleet import DeviceInfo, FleetStatus, HiveView, ProcessState, SupervisedWorker, WorkerView
from rbee_fleet.keeper.hosts.probe import HostProbe


class HostState(str, Enum):
    NOT_INSTALLED = "not installed"
    INSTALLING = "installing"
    STOPPED = "stopped"
    STARTING = "starting"
    UP = "up"
    DEGRADED = "degraded"
    UNREACHABLE = "unreachable"
    UNKNOWN = "unknown"


# A host action in progress shows as this state until it ends.
BUSY_STATES = {
    "install": HostState.INSTALLING, "upgrade": HostState.INSTALLING, "deploy": HostState.INSTALLING,
    "start": HostState.STARTING, "restart": HostState.STARTING,
    "stop": HostState.STOPPED, "uninstall": HostState.STOPPED,
}


@dataclass(frozen=True)
class HostWorker:
    """One worker on a host: the hive's process record and the queen's live view, either may be missing."""

    worker_id: str
    declared: bool
    supervised: SupervisedWorker | None
    view: WorkerView | None

    @property
    def state(self) -> str:
        if self.supervised is not None and self.supervised.state in (
                ProcessState.FAILED, ProcessState.STOPPING, ProcessState.STOPPED, ProcessState.RESTARTING):
            return self.supervised.state
        if self.view is not None and not self.view.live:
            return "lost"
        if self.view is not None:
            return self.view.heartbeat.state.value
        if self.supervised is not None:
            return self.supervised.state
        return "not running"


@dataclass(frozen=True)
class HostRow:
    alias: str
    address: str
    embedded: bool
    state: HostState
    reason: str  # why the state is what it is, in words
    version: str
    devices: DeviceInfo | None
    workers: tuple[HostWorker, ...]
    in_flight: int
    tokens_per_s: float

    @property
    def running(self) -> int:
        return sum(1 for w in self.workers if w.state == "ready")

    @property
    def declared(self) -> int:
        return sum(1 for w in self.workers if w.declared)


def _mb(mb: int) -> str:
    return f"{mb / 1024:.1f}G" if mb >= 1024 else f"{mb}M"


def devices_short(d: DeviceInfo | None) -> str:
    """Devices in a table cell: GPUs (llama-server's ids, else NVML's names) with memory used/total, or CPU
    cores and RAM used/total."""
    if d is None:
        return "-"
    if d.engine_devices:
        return ", ".join(f"{e.id} {_mb(e.memory_total_mb - e.memory_free_mb)}/{_mb(e.memory_total_mb)}"
                         for e in d.engine_devices)
    if d.gpus:
        return ", ".join(f"{g.name} {_mb(g.vram_total_mb - g.vram_free_mb)}/{_mb(g.vram_total_mb)}" for g in d.gpus)
    used = d.cpu.ram_total_mb - d.cpu.ram_available_mb
    return f"CPU {d.cpu.threads}t {_mb(used)}/{_mb(d.cpu.ram_total_mb)}"


def host_address(alias: str, decl: HiveDecl) -> str:
    return decl.ssh_host or decl.address or alias


def _host_workers(inv: Inventory, alias: str, hive: HiveView | None, views: list[WorkerView]) -> tuple[HostWorker, ...]:
    declared = [wid for wid, _ in inv.worker_plan(alias)]
    supervised = {w.worker_id: w for w in (hive.workers if hive else [])}
    live = {v.heartbeat.worker_id: v for v in views if v.heartbeat.hive_id == alias}
    # A deploy's replacement runs under another id (``ID.2``) and serves the declared worker: it takes its row.
    stand_in = {w.declared_as: w.worker_id for w in supervised.values()
                if w.declared_as in declared and w.worker_id != w.declared_as and w.declared_as not in supervised}
    rows = [stand_in.get(wid, wid) for wid in declared]
    ids = rows + sorted((set(supervised) | set(live)) - set(rows) - set(declared))
    return tuple(HostWorker(wid, wid in rows, supervised.get(wid), live.get(wid)) for wid in ids)


def _probed(probe: HostProbe, queen_up: bool) -> tuple[HostState, str]:
    """A remote host's state from its SSH probe (used when the queen has no live hive there)."""
    if probe.state == "not installed":
        return HostState.NOT_INSTALLED, probe.reason
    if probe.state == "stopped":
        return HostState.STOPPED, probe.reason
    if probe.state == "unreachable":
        return HostState.UNREACHABLE, f"ssh: {probe.reason}"
    if probe.state == "running":
        if queen_up:
            return HostState.DEGRADED, f"{probe.reason}, but the queen gets no heartbeat from it"
        return HostState.UNKNOWN, f"{probe.reason}; the queen is not answering"
    return HostState.UNKNOWN, f"ssh: {probe.reason}"


def _state(decl: HiveDecl, hive: HiveView | None, workers: tuple[HostWorker, ...],
           queen_up: bool, busy: str | None, probe: HostProbe | None = None) -> tuple[HostState, str]:
    if busy is not None:
        return BUSY_STATES.get(busy, HostState.STARTING), f"{busy} running"
    if not queen_up:
        if decl.embedded:
            return HostState.STOPPED, "the queen (and its embedded hive) is not running"
        if probe is not None:
            return _probed(probe, queen_up)
        return HostState.UNKNOWN, "the queen is not answering"
    if hive is None:
        if decl.embedded:
            return HostState.STARTING, "the embedded hive has not reported yet"
        if probe is not None:
            return _probed(probe, queen_up)
        return HostState.UNKNOWN, "no heartbeat from this hive yet (not deployed, stopped or unreachable)"
    if not hive.live:
        silent = f"no heartbeat for {hive.last_seen_s:.0f} s"
        if probe is not None and not decl.embedded:
            state, why = _probed(probe, queen_up)
            return state, f"{silent}; {why}"
        return HostState.UNREACHABLE, silent
    if any(w.state in ("loading", "starting", "restarting") for w in workers):
        return HostState.STARTING, "workers are loading"
    bad = [w.worker_id for w in workers
           if w.state in ("failed", "lost") or (w.declared and w.state not in ("ready", "running"))]
    if bad:
        return HostState.DEGRADED, f"not serving: {', '.join(bad)}"
    return HostState.UP, "all declared workers are serving"


def needs_probe(decl: HiveDecl, hive: HiveView | None) -> bool:
    """Whether only SSH can tell this host's state: a remote host the queen has no live hive of."""
    return not decl.embedded and (hive is None or not hive.live)


def host_rows(inv: Inventory, status: FleetStatus | None, busy: Mapping[str, str] | None = None,
              probes: Mapping[str, HostProbe] | None = None) -> list[HostRow]:
    """One row per inventory host, in inventory order; ``busy`` maps an alias to a running host action,
    ``probes`` to what SSH found there."""
    hives = {h.hive_id: h for h in status.hives} if status else {}
    views = status.workers if status else []
    rows = []
    for alias, decl in inv.hives.items():
        hive = hives.get(alias)
        probe = (probes or {}).get(alias) if needs_probe(decl, hive) else None
        if probe is not None and probe.state == "not installed":
            hive = None  # the queen's memory of an uninstalled hive (its version, its workers) is stale: SSH wins
        workers = _host_workers(inv, alias, hive, views)
        state, reason = _state(decl, hive, workers, status is not None, (busy or {}).get(alias), probe)
        live = [w.view for w in workers if w.view is not None and w.view.live]
        rows.append(HostRow(
            alias=alias, address=host_address(alias, decl), embedded=decl.embedded, state=state, reason=reason,
            version=hive.version if hive else "", devices=hive.devices if hive else None, workers=workers,
            in_flight=sum(v.in_flight for v in live),
            tokens_per_s=sum(v.heartbeat.tokens_per_second for v in live),
        ))
    return rows


@dataclass
class RateMeter:
    """Requests per second from successive samples of a monotonically growing counter."""

    window_s: float = 10.0
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, at: float, total: int) -> float | None:
        if self.samples and total < self.samples[-1][1]:
            self.samples.clear()  # the queen restarted
        self.samples.append((at, total))
        while len(self.samples) > 2 and at - self.samples[0][0] > self.window_s:
            self.samples.popleft()
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None


def format_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
