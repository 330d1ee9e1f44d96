"""The fleet table: one row per inventory host, keyed by alias, sortable and filterable, updated in place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual import on
from textual.message import Message
from textual.widgets import DataTable

from rbee_fleet.tui.format import STATE_STYLES
from rbee_fleet.tui.host_rows import HostRow, devices_short

COLUMNS: list[tuple[str, str, Callable[[HostRow], Any]]] = [
    # key, label, sort key
    ("host", "host", lambda r: r.alias),
    ("address", "address", lambda r: r.address),
    ("state", "state", lambda r: r.state.value),
    ("version", "version", lambda r: r.version),
    ("devices", "devices", lambda r: devices_short(r.devices)),
    ("workers", "workers", lambda r: r.running),
    ("in_flight", "in flight", lambda r: r.in_flight),
    ("tps", "tok/s", lambda r: r.tokens_per_s),
]
NARROW_HIDDEN = {"address", "version"}  # dropped below NARROW_WIDTH columns (80x24 terminals)
NARROW_WIDTH = 100


def _cells(row: HostRow) -> dict[str, Any]:
    return {
        "host": Text(row.alias, style="bold"),
        "address": row.address,
        "state": Text(row.state.value, style=STATE_STYLES.get(row.state, "")),
        "version": row.version or "-",
        "devices": devices_short(row.devices),
        # running, and of how many the inventory declares
        "workers": f"{row.running}/{row.declared}" if row.declared else str(row.running),
        "in_flight": str(row.in_flight),
        "tps": f"{row.tokens_per_s:.1f}",
    }


class FleetTable(DataTable):
    DEFAULT_CSS = """
    FleetTable {
        height: 1fr;
    }
    """

    class HostChosen(Message):
        """The operator pressed enter on a host."""

        def __init__(self, alias: str) -> None:
            super().__init__()
            self.alias = alias

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.filter_text = ""
        self.sort_column = "host"
        self.sort_reverse = False
        self.narrow = False
        self._rows: list[HostRow] = []

    def on_mount(self) -> None:
        self._add_columns()

    def _add_columns(self) -> None:
        for key, label, _ in COLUMNS:
            if not (self.narrow and key in NARROW_HIDDEN):
                self.add_column(label, key=key)

    def set_narrow(self, narrow: bool) -> None:
        """Fewer columns on a narrow terminal, so state and load stay in view."""
        if narrow != self.narrow:
            self.narrow = narrow
            self.clear(columns=True)
            self._add_columns()
            self._redraw()

    @property
    def selected_alias(self) -> str | None:
        if self.row_count == 0:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value

    def show(self, rows: list[HostRow] | tuple[HostRow, ...]) -> None:
        self._rows = list(rows)
        self._redraw()

    def set_filter(self, text: str) -> None:
        self.filter_text = text.strip().lower()
        self._redraw()

    def cycle_sort(self) -> str:
        keys = [k for k, _, _ in COLUMNS]
        self.sort_column = keys[(keys.index(self.sort_column) + 1) % len(keys)]
        self.sort_reverse = False
        self._redraw()
        return self.sort_column

    def sort_by(self, column: str) -> None:
        self.sort_reverse = not self.sort_reverse if column == self.sort_column else False
        self.sort_column = column
        self._redraw()

    def _visible(self) -> list[HostRow]:
        rows = [r for r in self._rows if not self.filter_text or self.filter_text in
                f"{r.alias} {r.address} {r.state.value} {devices_short(r.devices)}".lower()]
        key = next(k for c, _, k in COLUMNS if c == self.sort_column)
        return sorted(rows, key=key, reverse=self.sort_reverse)

    def _redraw(self) -> None:
        if not self.columns:
            return
        rows = self._visible()
        wanted = [r.alias for r in rows]
        current = [k.value for k in self.rows]
        columns = [c.value for c in self.columns]
        if wanted == current:
            for row in rows:
                cells = _cells(row)
                for col in columns:
                    self.update_cell(row.alias, col, cells[col], update_width=True)
            return
        selected = self.selected_alias
        self.clear()
        for row in rows:
            cells = _cells(row)
            self.add_row(*(cells[c] for c in columns), key=row.alias)
        if selected in wanted:
            self.move_cursor(row=wanted.index(selected), animate=False)

    @on(DataTable.RowSelected)
    def _chosen(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.post_message(self.HostChosen(event.row_key.value))

    @on(DataTable.HeaderSelected)
    def _header(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        if event.column_key.value is not None:
            self.sort_by(event.column_key.value)
