"""The inventory: add, edit and remove hosts and workers in forms, see the diff, write the file back."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label, Static

from rbee_fleet.common.inventory import InventoryError
from rbee_fleet.keeper.context import DEFAULT_INVENTORY
from rbee_fleet.tui.inventory_document import (
    HOST_FIELDS,
    WORKER_FIELDS,
    FieldSpec,
    FormValues,
    InventoryDocument,
    form_values,
)
from rbee_fleet.tui.screens.confirm import ConfirmScreen
from rbee_fleet.tui.screens.diff import DiffScreen
from rbee_fleet.tui.screens.form import FormScreen

if TYPE_CHECKING:
    from rbee_fleet.tui.app import KeeperApp

ALIAS_FIELD = FieldSpec("alias", str, required=True)
HOST_PLACEHOLDERS = {"address": "127.0.0.1 (the address the queen reaches this host at)",
                     "ssh_host": "(default: the address)", "port": "(default: [defaults].hive_port)"}


class InventoryScreen(Screen[None]):
    AUTO_FOCUS = "#inv-hosts"
    BINDINGS = [
        Binding("a", "add_host", "Add host"),
        Binding("e", "edit_host", "Edit host"),
        Binding("w", "add_worker", "Add worker"),
        Binding("delete", "remove", "Remove"),
        Binding("ctrl+s", "save", "Save"),
        Binding("u", "revert", "Undo edits"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.doc: InventoryDocument | None = None
        self.load_error: str | None = None

    @property
    def keeper(self) -> KeeperApp:
        return cast("KeeperApp", self.app)

    @property
    def path(self) -> Path:
        return Path(self.keeper.inventory_path or DEFAULT_INVENTORY)

    def compose(self) -> ComposeResult:
        yield Static("", id="inv-title", classes="title")
        with Horizontal(id="inv-tables"):
            with Vertical():
                yield Label("hosts", classes="section")
                yield DataTable(id="inv-hosts", cursor_type="row", zebra_stripes=True)
            with Vertical():
                yield Label("workers of the selected host", classes="section", id="inv-workers-label")
                yield DataTable(id="inv-workers", cursor_type="row", zebra_stripes=True)
        yield Static("", id="inv-check", classes="reason")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#inv-hosts", DataTable).add_columns("host", "embedded", "address", "ssh", "workers")
        self.query_one("#inv-workers", DataTable).add_columns("#", "model", "backend", "device", "count", "name", "ctx")
        self.load()

    def on_screen_resume(self) -> None:
        if self.doc is None or not self.doc.dirty:
            self.load()

    # -- loading and drawing ----------------------------------------------------------------------

    def load(self) -> None:
        try:
            self.doc = InventoryDocument.load(self.path)
            self.load_error = None
        except InventoryError as exc:
            self.doc, self.load_error = None, str(exc)
        self.redraw()

    def redraw(self) -> None:
        title = Text("inventory ", style="bold")
        title.append(str(self.path))
        if self.doc is not None and not self.doc.disk_text:
            title.append("  (new file: the built-in localhost fleet)", style="dim")
        if self.doc is not None and self.doc.dirty:
            title.append("  unsaved edits (ctrl+s shows the diff and saves, u undoes)", style="yellow")
        self.query_one("#inv-title", Static).update(title)
        hosts = self.query_one("#inv-hosts", DataTable)
        selected = self.selected_host
        hosts.clear()
        check = self.query_one("#inv-check", Static)
        if self.doc is None:
            check.update(Text(f"cannot edit in forms: {self.load_error}\nfix the file in an editor, then ctrl+r",
                              style="red"))
            self._draw_workers()
            return
        aliases = self.doc.hosts()
        for alias in aliases:
            h = self.doc.host(alias)
            ssh = f"{h.get('ssh_user', '')}@{h['ssh_host']}" if h.get("ssh_host") else h.get("ssh_user", "")
            ssh = "(local)" if h.get("transport") == "local" else ssh
            hosts.add_row(Text(alias, style="bold"), "yes" if h.get("embedded") else "", str(h.get("address", "")),
                          ssh.strip("@"), str(len(h.get("workers", []))), key=alias)
        if selected in aliases:
            hosts.move_cursor(row=aliases.index(selected), animate=False)
        self._draw_workers()
        try:
            self.doc.validate()
            check.update(Text("the inventory is valid", style="green"))
        except InventoryError as exc:
            check.update(Text(f"not valid yet (cannot be saved): {exc}", style="red"))

    def _draw_workers(self) -> None:
        table = self.query_one("#inv-workers", DataTable)
        table.clear()
        alias = self.selected_host
        self.query_one("#inv-workers-label", Label).update(f"workers of {alias}" if alias else "workers")
        if self.doc is None or alias is None:
            return
        for i, w in enumerate(self.doc.workers(alias)):
            table.add_row(str(i), str(w.get("model", "")), str(w.get("backend", "")), str(w.get("device", "")),
                          str(w.get("count", "")), str(w.get("name", "")), str(w.get("ctx_size", "")), key=str(i))

    @property
    def selected_host(self) -> str | None:
        table = self.query_one("#inv-hosts", DataTable)
        if table.row_count == 0:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    @property
    def selected_worker(self) -> int | None:
        table = self.query_one("#inv-workers", DataTable)
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return int(key) if key is not None else None

    @on(DataTable.RowHighlighted, "#inv-hosts")
    def _host_highlighted(self) -> None:
        self._draw_workers()

    @on(DataTable.RowSelected, "#inv-hosts")
    def _host_selected(self) -> None:
        self.action_edit_host()

    @on(DataTable.RowSelected, "#inv-workers")
    def _worker_selected(self) -> None:
        self.edit_worker(self.selected_worker)

    # -- editing ---------------------------------------------------------------------------------

    def _editable(self) -> InventoryDocument | None:
        if self.doc is None:
            self.notify(f"the inventory cannot be edited in forms: {self.load_error}", severity="error")
        return self.doc

    def action_add_host(self) -> None:
        if (doc := self._editable()) is None:
            return

        def submit(values: FormValues) -> bool:
            doc.set_host(str(values.pop("alias") or ""), values)
            return True

        self.app.push_screen(FormScreen("Add a host", [ALIAS_FIELD, *HOST_FIELDS], submit,
                                        placeholders=HOST_PLACEHOLDERS), self._edited)

    def action_edit_host(self) -> None:
        if (doc := self._editable()) is None or (alias := self.selected_host) is None:
            return
        values = {"alias": alias, **form_values(doc.host(alias), HOST_FIELDS)}

        def submit(new: FormValues) -> bool:
            doc.set_host(str(new.pop("alias") or ""), new, old_alias=alias)
            return True

        self.app.push_screen(FormScreen(f"Edit host {alias}", [ALIAS_FIELD, *HOST_FIELDS], submit, values,
                                        placeholders=HOST_PLACEHOLDERS), self._edited)

    def action_add_worker(self) -> None:
        self.edit_worker(None)

    def edit_worker(self, index: int | None) -> None:
        if (doc := self._editable()) is None:
            return
        alias = self.selected_host
        if alias is None:
            self.notify("add a host first", severity="warning")
            return
        values = form_values(doc.workers(alias)[index], WORKER_FIELDS) if index is not None else {"device": "cpu"}

        def submit(new: FormValues) -> bool:
            doc.set_worker(alias, index, new)
            return True

        title = f"Worker {index} of {alias}" if index is not None else f"Add a worker to {alias}"
        self.app.push_screen(FormScreen(title, WORKER_FIELDS, submit, values,
                                        placeholders={"device": "cpu, cuda:0 or cuda:0,1"}), self._edited)

    def _edited(self, changed: bool | None) -> None:
        if changed:
            self.redraw()

    @work(group="dialogs")
    async def action_remove(self) -> None:
        if (doc := self._editable()) is None or (alias := self.selected_host) is None:
            return
        if self.focused is self.query_one("#inv-workers") and (index := self.selected_worker) is not None:
            model = doc.workers(alias)[index].get("model", "?")
            if await self.app.push_screen_wait(ConfirmScreen(f"Remove worker {index} ({model}) from {alias}?",
                                                             yes="Remove")):
                doc.remove_worker(alias, index)
                self.redraw()
            return
        if await self.app.push_screen_wait(ConfirmScreen(
                f"Remove host {alias} from the inventory?", yes="Remove",
                detail="Only the inventory changes (after you save); the host itself is left alone.")):
            doc.remove_host(alias)
            self.redraw()

    @work(group="dialogs")
    async def action_save(self) -> None:
        if (doc := self._editable()) is None:
            return
        try:
            doc.validate()
        except InventoryError as exc:
            self.notify(f"not saved: {exc}", severity="error", timeout=10)
            return
        if not doc.dirty and doc.disk_text:
            self.notify("no unsaved edits")
            return
        if not await self.app.push_screen_wait(DiffScreen(str(doc.path), doc.diff())):
            return
        try:
            doc.save()
        except (OSError, InventoryError) as exc:
            self.notify(f"not saved: {exc}", severity="error", timeout=10)
            return
        self.notify(f"saved {doc.path}")
        self.keeper.reload_inventory(path=str(doc.path))
        self.redraw()

    @work(group="dialogs")
    async def action_revert(self) -> None:
        if self.doc is None or not self.doc.dirty:
            return
        if await self.app.push_screen_wait(ConfirmScreen("Undo all unsaved edits?", yes="Undo")):
            self.doc.revert()
            self.redraw()
