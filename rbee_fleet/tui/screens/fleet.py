"""The fleet: the queen's line, one row per inventory host, running operations; live."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Input, Static

from rbee_fleet.tui.snapshot import FleetSnapshot
from rbee_fleet.tui.widgets.fleet_table import NARROW_WIDTH, FleetTable
from rbee_fleet.tui.widgets.operations_bar import OperationsBar
from rbee_fleet.tui.widgets.queen_header import QueenHeader

if TYPE_CHECKING:
    from rbee_fleet.tui.app import KeeperApp


class FleetScreen(Screen[None]):
    AUTO_FOCUS = "#fleet"
    BINDINGS = [
        Binding("enter", "open_host", "Open", show=False),
        Binding("slash", "filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("o", "sort", "Sort"),
        Binding("w", "spawn", "Spawn worker"),
        Binding("m", "download", "Model"),
        Binding("a", "host_actions", "Hive…"),
        Binding("D", "deploy", "Deploy"),
        Binding("x", "ssh", "ssh", show=False),
    ]

    @property
    def keeper(self) -> KeeperApp:
        return cast("KeeperApp", self.app)

    def compose(self) -> ComposeResult:
        yield QueenHeader(id="queen")
        yield Static("", id="notice", classes="notice")
        yield Input(placeholder="filter hosts (alias, address, state, device); escape clears", id="filter")
        yield FleetTable(id="fleet")
        yield Static("", id="host-reason", classes="reason")
        yield OperationsBar(id="ops")
        yield Footer()

    def on_resize(self) -> None:
        self.table.set_narrow(self.size.width < NARROW_WIDTH)

    def on_mount(self) -> None:
        self.query_one("#filter").display = False
        self.table.set_narrow(self.size.width < NARROW_WIDTH)
        self.watch(self.keeper, "snapshot", self._show, init=True)
        self.keeper.operations_changed.subscribe(self, lambda _: self._show_ops())

    @property
    def table(self) -> FleetTable:
        return self.query_one(FleetTable)

    def _show(self, snap: FleetSnapshot) -> None:
        self.query_one(QueenHeader).show(snap, self.keeper.queen_url)
        notice = self.query_one("#notice", Static)
        notice.update(f"inventory: {snap.inventory_error}" if snap.inventory_error else "")
        notice.display = bool(snap.inventory_error)
        self.table.show(snap.rows)
        self._show_reason()
        self._show_ops()

    def _show_ops(self) -> None:
        self.query_one(OperationsBar).show(self.keeper.operations.running())

    def _show_reason(self) -> None:
        alias = self.table.selected_alias
        row = self.keeper.snapshot.row(alias) if alias else None
        self.query_one("#host-reason", Static).update(f"{row.alias}: {row.state.value}, {row.reason}" if row else "")

    @on(FleetTable.RowHighlighted)
    def _highlighted(self) -> None:
        self._show_reason()

    @on(FleetTable.HostChosen)
    def _chosen(self, event: FleetTable.HostChosen) -> None:
        self.keeper.open_host(event.alias)

    # -- actions ---------------------------------------------------------------------------------

    def action_open_host(self) -> None:
        if alias := self.table.selected_alias:
            self.keeper.open_host(alias)

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.display = False
        self.table.set_filter("")
        self.table.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.table.set_filter(event.value)

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        self.table.focus()

    def action_sort(self) -> None:
        column = self.table.cycle_sort()
        self.notify(f"sorted by {column}", timeout=2)

    def action_spawn(self) -> None:
        self.keeper.spawn_worker(self.table.selected_alias)

    def action_download(self) -> None:
        self.keeper.download_model(self.table.selected_alias)

    def action_host_actions(self) -> None:
        if alias := self.table.selected_alias:
            self.keeper.host_menu(alias)

    def action_deploy(self) -> None:
        self.keeper.deploy(None)

    def action_ssh(self) -> None:
        if alias := self.table.selected_alias:
            self.keeper.ssh(alias)
