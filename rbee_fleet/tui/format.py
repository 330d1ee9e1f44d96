"""Small text formats shared by the TUI's screens and widgets."""

from __future__ import annotations

from collections.abc import Sequence

from rbee_fleet.tui.host_rows import HostState

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"

STATE_STYLES: dict[HostState, str] = {
    HostState.UP: "green",
    HostState.DEGRADED: "yellow",
    HostState.STARTING: "cyan",
    HostState.INSTALLING: "cyan",
    HostState.STOPPED: "dim",
    HostState.NOT_INSTALLED: "dim",
    HostState.UNREACHABLE: "red",
    HostState.UNKNOWN: "dim",
}

WORKER_STATE_STYLES = {
    "ready": "green", "running": "green", "loading": "cyan", "starting": "cyan", "restarting": "yellow",
    "draining": "yellow", "stopping": "yellow", "stopped": "dim", "not running": "dim", "failed": "red", "lost": "red",
}


def spark(values: Sequence[float], width: int = 12) -> str:
    """A one-line sparkline of the last ``width`` values, scaled to their maximum."""
    tail = list(values)[-width:]
    if not tail:
        return ""
    top = max(tail)
    if top <= 0:
        return SPARK_BLOCKS[0] * len(tail)
    last = len(SPARK_BLOCKS) - 1
    return "".join(SPARK_BLOCKS[min(last, int(v / top * last + 0.5))] for v in tail)


def size(n_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes:.0f} B"


def age(seconds: float) -> str:
    """How long ago, compactly: 5s, 3m, 2h, 4d."""
    s = max(0, int(seconds))
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= scale:
            return f"{s // scale}{unit}"
    return f"{s}s"
