"""How deploys look: a live per-host view while they run, a final table, JSON for scripts."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console, Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from rbee_fleet.deploy.runner import CANCELLED, CHANGED, FAILED, OK, SKIPPED, HostResult

STYLE = {OK: "green", CHANGED: "yellow", FAILED: "red", CANCELLED: "magenta", SKIPPED: "dim"}


class DeployView:
    """One line per host, kept current; plain lines instead (one per step per host) when stderr is not a
    terminal (CI logs) or when stdout carries JSON (``quiet``)."""

    def __init__(self, console: Console, aliases: list[str], quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self.messages: dict[str, str] = {a: "waiting" for a in aliases}
        self.started = time.monotonic()
        self._live = Live(console=console, refresh_per_second=8, transient=True) if console.is_terminal and not quiet else None
        self._last_plain: dict[str, float] = {}

    def __enter__(self) -> DeployView:  # noqa: PYI034 - a final class in practice
        if self._live is not None:
            self._live.update(self._render())
            self._live.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.stop()

    def update(self, alias: str, message: str) -> None:
        if self.messages.get(alias) == message and self._live is None:
            return  # the same step again: one line per step
        self.messages[alias] = message
        if self._live is not None:
            self._live.update(self._render())
            return
        now = time.monotonic()
        if message.startswith("uploading") and now - self._last_plain.get(alias, 0.0) < 2.0 and "100%" not in message:
            return
        self._last_plain[alias] = now
        self.console.print(f"[bold]{alias}[/]: {message}", highlight=False, markup=True)

    def _render(self) -> Group:
        table = Table.grid(padding=(0, 2))
        for alias, message in self.messages.items():
            table.add_row(Spinner("dots"), Text(alias, style="bold"), Text(message, overflow="ellipsis", no_wrap=True))
        return Group(Text(f"deploying {len(self.messages)} host(s), {time.monotonic() - self.started:.0f} s"), table)


def results_table(results: list[HostResult], title: str = "deploy") -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("host", "result", "version", "time", "reason"):
        table.add_column(col, overflow="fold")
    for r in results:
        table.add_row(r.alias, f"[{STYLE.get(r.status, 'white')}]{r.status}[/]", r.version or "",
                      f"{r.elapsed_s:.1f}s", r.reason)
    return table


def summary(results: list[HostResult]) -> str:
    counts = {s: sum(1 for r in results if r.status == s) for s in (OK, CHANGED, FAILED, CANCELLED, SKIPPED)}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no hosts"
