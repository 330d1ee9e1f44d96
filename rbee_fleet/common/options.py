"""``KEY=VALUE`` command-line options (``--option``) for backends: values are JSON when they parse as JSON."""

from __future__ import annotations

import json
from typing import Any


def parse_key_values(pairs: list[str], flag: str = "--option") -> dict[str, Any]:
    """``["cache=q4", "gpu_split=[20,24]"]`` -> ``{"cache": "q4", "gpu_split": [20, 24]}``; ValueError if malformed."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {pair!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options
