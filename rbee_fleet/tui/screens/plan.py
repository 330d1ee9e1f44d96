"""A deploy's plan, checked (remote hosts over SSH, in check mode) and shown before anything changes;
dismisses with True to go ahead. Hosts that failed the check are not deployed."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Label

from rbee_fleet.keeper.hosts.service import PlanStep

STEP_STYLES = {"ok": "green", "change": "yellow", "failed": "red"}


class PlanScreen(ModalScreen[bool]):
    BINDINGS = [
        Binding("y", "dismiss(True)", "Deploy"),
        Binding("n,escape", "dismiss(False)", "Cancel"),
    ]

    def __init__(self, steps: list[PlanStep]) -> None:
        super().__init__()
        self.steps = steps

    def compose(self) -> ComposeResult:
        changes = sum(1 for s in self.steps if s.status == "change")
        failed = len({s.alias for s in self.steps if s.status == "failed"})
        with Vertical(classes="dialog wide"):
            yield Label(f"Deploy plan: {changes} change(s), {failed} host(s) failed the check", classes="dialog-title")
            yield DataTable(id="plan", cursor_type="row", zebra_stripes=True)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Deploy (y)", variant="primary", id="go", disabled=changes == 0)
                yield Button("Cancel (n)", id="cancel")

    def on_mount(self) -> None:
        table = self.query_one("#plan", DataTable)
        table.add_columns("host", "what", "status", "detail")
        for s in self.steps:
            table.add_row(s.alias, s.what, Text(s.status, style=STEP_STYLES[s.status]), s.detail)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "go")
