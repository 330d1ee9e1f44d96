"""What a JSON request body may be: valid JSON and Unicode, shallow enough, numbers of sane size.

Each rule turns a body that would crash something later (a ``RecursionError`` in the parser or in
pydantic, Python's 4300-digit limit on integers, a lone UTF-16 surrogate that no tokenizer can encode)
into a ``BadRequest`` that says what is wrong, before any worker sees the request.
"""

from __future__ import annotations

import json
from typing import Any

from rbee_fleet.common.errors import BadRequest

MAX_DEPTH = 32  # nesting of objects and arrays; OpenAI requests need about 6
MAX_INT_DIGITS = 40  # far beyond any 64-bit value, far below Python's 4300-digit limit


class _Refused(ValueError):
    pass


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer has {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS} are accepted)")
    return int(text)


def _bounded_float(text: str) -> float:
    if len(text) > 400:
        raise _Refused(f"a number is written with {len(text)} characters")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused(f"the number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON value")


def loads(raw: bytes | str) -> Any:
    """``json.loads`` under the rules above; ``BadRequest`` for anything that breaks them."""
    try:
        value = json.loads(raw, parse_int=_bounded_int, parse_float=_bounded_float, parse_constant=_no_constant)
    except _Refused as exc:
        raise BadRequest(f"the request body is refused: {exc}") from None
    except RecursionError:
        raise BadRequest(f"the request body is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"malformed JSON in the request body: {exc}") from None
    except ValueError as exc:  # anything else the decoder refuses
        raise BadRequest(f"malformed JSON in the request body: {exc}") from None
    check(value)
    return value


def check(value: Any) -> None:
    """Depth and valid Unicode everywhere (keys too), walked without recursion."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, str):
            _check_text(item, where)
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise BadRequest(f"the request body is nested too deeply (at most {MAX_DEPTH} levels)", param=where or None)
        if isinstance(item, dict):
            for key, child in item.items():
                path = f"{where}.{key}" if where else str(key)
                _check_text(key, path)
                stack.append((child, depth + 1, path))
        else:
            stack.extend((child, depth + 1, f"{where}.{i}" if where else str(i)) for i, child in enumerate(item))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise BadRequest(
            f"'{_printable(where)}' is not valid Unicode: it holds a lone UTF-16 surrogate (\\u{ord(bad):04x})",
            param=_printable(where) or None,
        ) from None


def _printable(path: str) -> str:
    """A field path fit for an error message (keys may hold surrogates too), cut short."""
    return path.encode("utf-8", "backslashreplace").decode()[:200]
