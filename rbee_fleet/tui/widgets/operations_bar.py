"""The operations running now, one line each with progress, at the bottom of the fleet and host screens."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from rbee_fleet.tui.format import size
from rbee_fleet.tui.operations import TrackedOperation


def operation_line(op: TrackedOperation) -> Text:
    text = Text("⟳ ", style="cyan")
    text.append(op.label, style="bold")
    prog = op.progress
    if prog is not None and prog.total:
        frac = min(1.0, prog.current / prog.total)
        filled = round(frac * 20)
        text.append(" " + "█" * filled + "░" * (20 - filled), style="cyan")
        text.append(f" {frac * 100:3.0f}%")
        if prog.unit == "bytes":
            text.append(f" {size(prog.current)}/{size(prog.total)}", style="dim")
    message = op.last_message
    if message:
        text.append(f"  {message[:80]}", style="dim")
    return text


class OperationsBar(Static):
    DEFAULT_CSS = """
    OperationsBar {
        height: auto;
        max-height: 5;
        padding: 0 1;
        display: none;
    }
    OperationsBar.-active {
        display: block;
    }
    """

    def show(self, running: list[TrackedOperation]) -> None:
        self.set_class(bool(running), "-active")
        lines = Text("\n").join(operation_line(op) for op in running[-5:])
        self.update(lines)
