"""A scrolling log of job events (or of any lines), newest at the bottom."""

from __future__ import annotations

import time

from rich.text import Text
from textual.widgets import RichLog

from rbee_fleet.contracts.fleet import JobEvent
from rbee_fleet.tui.format import size

EVENT_STYLES = {"error": "bold red", "cancelled": "yellow", "result": "green", "started": "cyan"}


def event_text(event: JobEvent, clock: bool = True) -> Text:
    """One event as a line: time, type, message and, for byte progress, how far it got."""
    text = Text()
    if clock:
        text.append(time.strftime("%H:%M:%S ", time.localtime(event.ts)), style="dim")
    text.append(f"{event.type:<9}", style=EVENT_STYLES.get(event.type, ""))
    text.append(event.message or ("done" if event.type == "result" else ""))
    prog = event.progress
    if prog is not None and prog.unit == "bytes":
        pct = f" {100 * prog.current / prog.total:.0f}%" if prog.total else ""
        text.append(f"{pct} ({size(prog.current)}{f' of {size(prog.total)}' if prog.total else ''})", style="dim")
    return text


class JobLog(RichLog):
    DEFAULT_CSS = """
    JobLog {
        height: 1fr;
        border: round $primary 50%;
    }
    """

    def __init__(self, clock: bool = True, **kwargs) -> None:
        super().__init__(wrap=True, markup=False, highlight=False, max_lines=5000, min_width=20, **kwargs)
        self.clock = clock

    def add_event(self, event: JobEvent) -> None:
        self.write(event_text(event, self.clock))

    def add_line(self, line: str, style: str = "") -> None:
        self.write(Text(line, style=style))
