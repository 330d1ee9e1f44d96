"""A form built from field specs: one row per field (a checkbox for flags, a choice list for options),
with each field's error shown under it. Compact, so a whole form fits an 80x24 terminal."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.suggester import SuggestFromList
from textual.widgets import Checkbox, Input, Label, Select

from rbee_fleet.tui.inventory_document import FieldSpec, FormValues


class FormFields(Vertical):
    DEFAULT_CSS = """
    FormFields {
        height: auto;
    }
    FormFields .field-row {
        height: auto;
        margin-bottom: 1;
    }
    FormFields .field-row-inner {
        height: auto;
    }
    FormFields .field-label {
        width: 16;
        color: $text-muted;
    }
    FormFields .field-error {
        color: $error;
        padding-left: 16;
        display: none;
    }
    FormFields .field-error.-shown {
        display: block;
    }
    FormFields Input, FormFields Select {
        width: 1fr;
    }
    FormFields Checkbox {
        border: none;
        padding: 0;
        height: 1;
    }
    """

    def __init__(self, fields: list[FieldSpec], values: FormValues | None = None,
                 suggestions: dict[str, list[str]] | None = None, placeholders: dict[str, str] | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.fields = fields
        self.initial = values or {}
        self.suggestions = suggestions or {}
        self.placeholders = placeholders or {}

    def compose(self) -> ComposeResult:
        for spec in self.fields:
            value = self.initial.get(spec.name)
            with Vertical(classes="field-row"):
                with Horizontal(classes="field-row-inner"):
                    yield Label(spec.name.replace("_", " ") + (" *" if spec.required else ""), classes="field-label")
                    yield self._input(spec, value)
                yield Label("", classes="field-error", id=f"error-{spec.name}")

    def _input(self, spec: FieldSpec, value: object) -> Checkbox | Select[str] | Input:
        wid = f"field-{spec.name}"
        if spec.kind is bool:
            return Checkbox("", value=bool(value), id=wid)
        if spec.choices:
            return Select([(c, c) for c in spec.choices], value=value if value in spec.choices else Select.NULL,
                          allow_blank=not spec.required, prompt="(default)", id=wid, compact=True)
        words = self.suggestions.get(spec.name)
        return Input(value="" if value is None else str(value), id=wid, compact=True,
                     placeholder=self.placeholders.get(spec.name, "(default)"),
                     suggester=SuggestFromList(words, case_sensitive=False) if words else None,
                     type="integer" if spec.kind is int else "number" if spec.kind is float else "text")

    def values(self) -> FormValues:
        out: FormValues = {}
        for spec in self.fields:
            widget = self.query_one(f"#field-{spec.name}")
            if isinstance(widget, Checkbox):
                out[spec.name] = widget.value
            elif isinstance(widget, Select):
                out[spec.name] = None if widget.value is Select.NULL else str(widget.value)
            elif isinstance(widget, Input):
                out[spec.name] = widget.value
        return out

    def show_errors(self, errors: dict[str, str]) -> None:
        for spec in self.fields:
            label = self.query_one(f"#error-{spec.name}", Label)
            message = errors.get(spec.name, "")
            label.update(message)
            label.set_class(bool(message), "-shown")

    def focus_first(self, errors: dict[str, str] | None = None) -> None:
        """Focus the first field with an error, else the first one still empty, else the first."""
        values = self.values()
        names = [s.name for s in self.fields if (s.name in errors if errors else values.get(s.name) in ("", None))]
        names = names or [s.name for s in self.fields[:1]]
        if names:
            self.query_one(f"#field-{names[0]}").focus()
