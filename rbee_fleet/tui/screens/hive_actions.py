"""Pick an action for one host: the hive's lifecycle, its host key, its log, a shell."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from rbee_fleet.contracts.vocabulary import HiveAction

CHOICES: list[tuple[str, str]] = [
    *((a.value, f"{a.value} the hive") for a in HiveAction),
    ("deploy", "deploy this host (plan first)"),
    ("host_key", "check and accept the host key"),
    ("log", "follow the hive's log"),
    ("ssh", "open a shell on the host (ssh)"),
]


class HiveActionsScreen(ModalScreen[str | None]):
    """Dismisses with the chosen action's name, or None."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, alias: str, note: str = "") -> None:
        super().__init__()
        self.alias, self.note = alias, note

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Host {self.alias}", classes="dialog-title")
            if self.note:
                yield Label(self.note, classes="dialog-detail")
            yield OptionList(*(Option(text, id=name) for name, text in CHOICES), id="choices")

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)
