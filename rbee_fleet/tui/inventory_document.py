"""Edit an inventory file: add, change and remove hosts and workers, show the diff, write it back.

Edits work on the TOML document as data, so keys no form knows about (``[queen]``, ``[defaults]``,
worker ``options``, keys added by later versions) survive a round trip. The file is written with
tomli-w, which does not keep comments: the diff shown before saving makes that visible.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import sys
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ValidationError

from rbee_fleet.common.inventory import (
    ALIAS_RE,
    HiveDecl,
    Inventory,
    WorkerDecl,
    default_inventory,
    parse_inventory,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

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


def _apply(table: dict[str, Any], values: dict[str, Any]) -> None:
    for key, value in values.items():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value


def form_values(table: dict[str, Any], fields: list[FieldSpec]) -> FormValues:
    """A section's current values as a form shows them."""
    out: FormValues = {}
    for spec in fields:
        value = table.get(spec.name)
        out[spec.name] = value if isinstance(value, bool) or value is None else str(value)
    return out


class InventoryDocument:
    """An inventory file being edited: the data, what is on disk, and the diff between them."""

    def __init__(self, path: Path, data: dict[str, Any], disk_text: str) -> None:
        self.path = path
        self.data = data
        self.disk_text = disk_text
        self._saved = copy.deepcopy(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> InventoryDocument:
        """Read ``path`` (a missing file starts from the built-in localhost fleet); bad TOML raises."""
        p = Path(path)
        if not p.exists():
            data = default_inventory().model_dump(mode="json", exclude_defaults=True)
            return cls(p, data, "")
        text = p.read_text(encoding="utf-8")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
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
        return self.data != self._saved

    # -- editing -----------------------------------------------------------------------------------

    def set_host(self, alias: str, raw: FormValues, old_alias: str | None = None) -> None:
        """Add ``alias`` or change it (renaming ``old_alias`` in place); validates the form first."""
        if not re.match(ALIAS_RE, alias or ""):
            raise FormError({"alias": "letters, digits, '.', '_' or '-' (at most 63)"})
        hives: dict[str, Any] = self.data.setdefault("hives", {})
        if alias != old_alias and alias in hives:
            raise FormError({"alias": f"{alias!r} is already in the inventory"})
        values = coerce_form(HiveDecl, HOST_FIELDS, raw)
        if values.get("embedded"):
            others = [a for a, h in hives.items() if h.get("embedded") and a != old_alias]
            if others:
                raise FormError({"embedded": f"only one hive can be embedded; {others[0]} already is"})
        if old_alias is None:
            hives[alias] = {}
        elif alias != old_alias:
            self.data["hives"] = {(alias if a == old_alias else a): t for a, t in hives.items()}
        _apply(self.data["hives"][alias], values)

    def remove_host(self, alias: str) -> None:
        del self.data.get("hives", {})[alias]

    def set_worker(self, alias: str, index: int | None, raw: FormValues) -> None:
        """Add a worker to ``alias`` (``index`` None) or change worker ``index``."""
        values = coerce_form(WorkerDecl, WORKER_FIELDS, raw)
        workers = self.host(alias).setdefault("workers", [])
        if index is None:
            workers.append({})
            index = len(workers) - 1
        _apply(workers[index], values)

    def remove_worker(self, alias: str, index: int) -> None:
        del self.host(alias)["workers"][index]

    def revert(self) -> None:
        self.data = copy.deepcopy(self._saved)

    # -- writing -----------------------------------------------------------------------------------

    def render(self) -> str:
        return tomli_w.dumps(self.data)

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
        self._saved = copy.deepcopy(self.data)
        return inventory

