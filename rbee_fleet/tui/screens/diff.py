"""The inventory change as a unified diff, shown before it is written; dismisses with True to save."""

from __future__ import annotations

from rich.syntax import Syntax
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static


class DiffScreen(ModalScreen[bool]):
    BINDINGS = [
        Binding("y,ctrl+s", "dismiss(True)", "Save"),
        Binding("n,escape", "dismiss(False)", "Cancel"),
    ]

    def __init__(self, path: str, diff: str) -> None:
        super().__init__()
        self.path, self.diff = path, diff

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label(f"Save {self.path}?", classes="dialog-title")
            yield Label("Only these lines change: comments, order and layout are kept.", classes="dialog-detail")
            with VerticalScroll(id="diff-view"):
                yield Static(Syntax(self.diff or "(no change)", "diff", theme="ansi_dark", word_wrap=True))
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save (y)", variant="primary", id="save")
                yield Button("Cancel (n)", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "save")
