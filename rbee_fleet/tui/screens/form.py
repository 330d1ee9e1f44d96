"""A modal form: fields from specs, validated by the caller's ``submit`` on enter or Save.

``submit`` turns the values into a result or raises ``FormError``; the errors show under their fields
and the form stays open, so nothing typed is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

from rbee_fleet.tui.inventory_document import FieldSpec, FormError, FormValues
from rbee_fleet.tui.widgets.form_fields import FormFields

T = TypeVar("T")


class FormScreen(ModalScreen[T | None], Generic[T]):
    BINDINGS = [
        Binding("escape", "dismiss(None)", "Cancel"),
        Binding("ctrl+s", "submit", "Save"),
    ]

    def __init__(self, title: str, fields: list[FieldSpec], submit: Callable[[FormValues], T],
                 values: FormValues | None = None, suggestions: dict[str, list[str]] | None = None,
                 placeholders: dict[str, str] | None = None, note: str = "", ok: str = "Save") -> None:
        super().__init__()
        self.form_title, self.note, self.ok = title, note, ok
        self.submit = submit
        self.fields = FormFields(fields, values, suggestions, placeholders, id="form-fields")

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog form"):
            yield Label(self.form_title, classes="dialog-title")
            if self.note:
                yield Label(self.note, classes="dialog-detail")
            with VerticalScroll(classes="form-body"):
                yield self.fields
            yield Label("", id="form-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button(f"{self.ok} (ctrl+s)", variant="primary", id="ok", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.fields.focus_first()

    @on(Button.Pressed, "#ok")
    @on(Input.Submitted)
    def action_submit(self) -> None:
        try:
            result = self.submit(self.fields.values())
        except FormError as exc:
            known = {s.name for s in self.fields.fields}
            self.fields.show_errors(exc.errors)
            other = "; ".join(f"{k}: {v}" for k, v in exc.errors.items() if k not in known)
            error = self.query_one("#form-error", Label)
            error.update(other)
            error.set_class(bool(other), "-shown")
            self.fields.focus_first({k: v for k, v in exc.errors.items() if k in known} or None)
            return
        self.dismiss(result)

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)
