"""The queen's line at the top of the fleet screen: address, version, uptime, models, request rate."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from rbee_fleet.tui.host_rows import format_duration
from rbee_fleet.tui.snapshot import FleetSnapshot


class QueenHeader(Static):
    DEFAULT_CSS = """
    QueenHeader {
        height: auto;
        padding: 0 1;
        background: $boost;
    }
    QueenHeader.-down {
        background: $error 30%;
    }
    """

    def show(self, snap: FleetSnapshot, queen_url: str | None) -> None:
        text = Text()
        text.append("queen ", style="bold")
        text.append(queen_url or "?")
        status = snap.status
        self.set_class(status is None and snap.polled, "-down")
        if status is None:
            if snap.inventory_error and queen_url is None:
                text.append("  inventory has errors: see the Inventory screen (4)", style="bold red")
            elif not snap.polled:
                text.append("  connecting…", style="dim")
            else:
                text.append("  not answering", style="bold red")
                if snap.error:
                    text.append(f": {snap.error}", style="red")
            self.update(text)
            return
        q = status.queen
        rate = f"{snap.request_rate:.1f} req/s" if snap.request_rate is not None else "- req/s"
        parts = [f"v{q.version}", f"up {format_duration(q.uptime_s)}", rate, f"{q.in_flight} in flight"]
        text.append("  " + "  ".join(parts), style="")
        text.append("\nmodels ", style="bold")
        text.append(", ".join(status.models) or "none serving", style="green" if status.models else "yellow")
        waiting = [m.id for m in status.catalog if m.state != "loaded"]  # loaded on the first request for them
        if waiting:
            text.append("  on demand: " + ", ".join(waiting), style="dim")
        self.update(text)
