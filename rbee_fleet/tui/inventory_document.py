"""Edit an inventory file: add, change and remove hosts and workers, show the diff, write it back.

Edits work on the TOML document itself (tomlkit), so what no form touches stays as the operator wrote it:
comments, the order of tables and keys, blank lines, and keys no form knows about (``[queen]``,
``[defaults]``, worker ``options``, keys added by later versions). The diff shown before saving lists
exactly the lines an edit changes.
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomlkit
from pydantic import BaseModel, ValidationError
from tomlkit.exceptions import ParseError
from tomlkit.items import AoT, Table
from tomlkit.toml_document import TOMLDocument

from rbee_fleet.common.inventory import (
    ALIAS_RE,
    HiveDecl,
    Inventory,
    WorkerDecl,
    default_inventory,
    parse_inventory,
)

FormValues = dict[str, "str | bool | None"]


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: type  # str, int, float or bool
    choices: tuple[str, ...] = ()  # for Literal fields
    required: bool = False
    default: Any = None


def _spec(name: str, annotation: Any, required: bool, default: Any = None) -> FieldSpec:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        annotation = inner[0] if len(inner) == 1 else str
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return FieldSpec(name, str, tuple(str(a) for a in args), required, default)
    kind = annotation if annotation in (str, int, float, bool) else str
    return FieldSpec(name, kind, (), required, default)


def form_fields(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[FieldSpec]:
    """The scalar fields of an inventory section, in declaration order (what a form shows)."""
    return [_spec(n, f.annotation, f.is_required(), None if f.is_required() else f.default)
            for n, f in model.model_fields.items()
            if n not in skip and typing.get_origin(f.annotation) not in (list, dict)]


HOST_FIELDS = form_fields(HiveDecl, skip=("workers",))
WORKER_FIELDS = form_fields(WorkerDecl, skip=("options",))


class FormError(Exception):
    """Form values that do not validate: ``errors`` maps each bad field to its reason."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


def coerce_form(model: type[BaseModel], fields: list[FieldSpec], raw: FormValues) -> dict[str, Any]:
    """Turn form strings into typed values (None: remove the key) and validate them against ``model``."""
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for spec in fields:
        if spec.name not in raw:
            continue
        value = raw[spec.name]
        if isinstance(value, str):
            value = value.strip()
        if value in ("", None):
            values[spec.name] = None
            if spec.required:
                errors[spec.name] = "required"
            continue
        try:
            if spec.kind is bool:
                flag = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
                values[spec.name] = None if flag == spec.default else flag  # an unticked box adds no key
            else:
                values[spec.name] = spec.kind(value)
        except ValueError:
            errors[spec.name] = f"must be {'a whole number' if spec.kind is int else 'a number'}"
    if not errors:
        try:
            model.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            for err in exc.errors():
                name = str(err["loc"][0]) if err["loc"] else "form"
                errors.setdefault(name, err["msg"].removeprefix("Value error, "))
    if errors:
        raise FormError(errors)
    return values


def _insert_after(table: Table, after: str, key: str, value: Any) -> None:
    """``table[key] = value``, placed right after the key ``after`` (tomlkit has no public insert-after; its
    private one is gone from 0.15, so ``pyproject.toml`` keeps tomlkit below that)."""
    table.value._insert_after(after, key, value)
    dict.__setitem__(table, key, table.value.item(key))  # what Table.__setitem__ keeps in step


def _apply(table: Table, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if value is None:
            table.pop(key, None)
            continue
        keys = [k for k, v in table.items() if not isinstance(v, (Table, AoT))]
        if key in table or not keys:
            table[key] = value
        else:
            # After the table's last key: tomlkit keeps a comment that introduces the next table at the end of
            # this one, and a plain append would land below that comment.
            _insert_after(table, keys[-1], key, value)


def _rename(hives: Table, old: str, new: str) -> None:
    """Rename a host where it stands, keeping its comments and layout."""
    table = hives[old]
    _insert_after(hives, old, new, table)
    hives.remove(old)
    table.name = new
    table.invalidate_display_name()
    for child in table.values():
        if isinstance(child, (Table, AoT)):
            child.invalidate_display_name()


def form_values(table: dict[str, Any], fields: list[FieldSpec]) -> FormValues:
    """A section's current values as a form shows them."""
    out: FormValues = {}
    for spec in fields:
        value = table.get(spec.name)
        out[spec.name] = value if isinstance(value, bool) or value is None else str(value)
    return out


class InventoryDocument:
    """An inventory file being edited: the data, what is on disk, and the diff between them."""

    def __init__(self, path: Path, data: TOMLDocument, disk_text: str) -> None:
        self.path = path
        self.data = data
        self.disk_text = disk_text
        self._saved = data.as_string()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> InventoryDocument:
        """Read ``path`` (a missing file starts from the built-in localhost fleet); bad TOML raises."""
        p = Path(path)
        if not p.exists():
            data = tomlkit.document()
            data.update(default_inventory().model_dump(mode="json", exclude_defaults=True))
            return cls(p, data, "")
        text = p.read_text(encoding="utf-8")
        try:
            data = tomlkit.parse(text)
        except ParseError:
            parse_inventory(text, str(p))  # raises the InventoryError with its line
            raise
        return cls(p, data, text)

    # -- reading -----------------------------------------------------------------------------------

    def hosts(self) -> list[str]:
        return list(self.data.get("hives", {}))

    def host(self, alias: str) -> dict[str, Any]:
        try:
            return self.data["hives"][alias]
        except KeyError:
            raise KeyError(f"no host {alias!r} in {self.path}") from None

    def workers(self, alias: str) -> list[dict[str, Any]]:
        return self.host(alias).get("workers", [])

    @property
    def dirty(self) -> bool:
        return self.render() != self._saved

    # -- editing -----------------------------------------------------------------------------------

    def set_host(self, alias: str, raw: FormValues, old_alias: str | None = None) -> None:
        """Add ``alias`` or change it (renaming ``old_alias`` in place); validates the form first."""
        if not re.match(ALIAS_RE, alias or ""):
            raise FormError({"alias": "letters, digits, '.', '_' or '-' (at most 63)"})
        hives = self.data.get("hives")
        if hives is None:
            hives = self.data["hives"] = tomlkit.table(is_super_table=True)
        if alias != old_alias and alias in hives:
            raise FormError({"alias": f"{alias!r} is already in the inventory"})
        values = coerce_form(HiveDecl, HOST_FIELDS, raw)
        if values.get("embedded"):
            others = [a for a, h in hives.items() if h.get("embedded") and a != old_alias]
            if others:
                raise FormError({"embedded": f"only one hive can be embedded; {others[0]} already is"})
        if old_alias is None:
            hives[alias] = tomlkit.table()
        elif alias != old_alias:
            _rename(hives, old_alias, alias)
        _apply(hives[alias], values)

    def remove_host(self, alias: str) -> None:
        del self.data.get("hives", {})[alias]

    def set_worker(self, alias: str, index: int | None, raw: FormValues) -> None:
        """Add a worker to ``alias`` (``index`` None) or change worker ``index``."""
        values = coerce_form(WorkerDecl, WORKER_FIELDS, raw)
        host = self.host(alias)
        if "workers" not in host:
            if host:
                host.add(tomlkit.nl())  # a blank line before the first [[…workers]], as people write it
            host["workers"] = tomlkit.aot()
        workers = host["workers"]
        if index is None:
            workers.append(tomlkit.table())
            index = len(workers) - 1
        _apply(workers[index], values)

    def remove_worker(self, alias: str, index: int) -> None:
        del self.host(alias)["workers"][index]

    def revert(self) -> None:
        self.data = tomlkit.parse(self._saved)

    # -- writing -----------------------------------------------------------------------------------

    def render(self) -> str:
        return self.data.as_string()

    def validate(self) -> Inventory:
        """The edited inventory, checked as the keeper and queen will read it (raises ``InventoryError``)."""
        return parse_inventory(self.render(), str(self.path))

    def diff(self) -> str:
        return "".join(difflib.unified_diff(
            self.disk_text.splitlines(keepends=True), self.render().splitlines(keepends=True),
            fromfile=f"{self.path} (on disk)", tofile=f"{self.path} (edited)",
        ))

    def save(self) -> Inventory:
        """Validate, then replace the file atomically (same mode); nothing is written on a bad inventory."""
        inventory = self.validate()
        text = self.render()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = self.path.stat().st_mode & 0o777 if self.path.exists() else 0o644
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(tmp, mode)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.disk_text = text
        self._saved = text
        return inventory

