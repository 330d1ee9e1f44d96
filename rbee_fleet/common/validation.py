"""Turn pydantic validation failures into 400s that name the offending field."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from rbee_fleet.common.errors import BadRequest

M = TypeVar("M", bound=BaseModel)


def _loc(err: Any) -> str:
    return ".".join(str(p) for p in err["loc"])


def describe(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        loc = _loc(err)
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "is required"
        parts.append(f"'{loc}' {msg}" if loc else msg)
    return "; ".join(parts)


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        param = _loc(errors[0]) if errors else None
        raise BadRequest(describe(exc), param=param or None) from None
