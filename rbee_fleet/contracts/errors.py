"""OpenAI's error shape as plain data: what every program answers a failure with.

Kept apart from ``openai`` (the request and answer models, which take pydantic a while to build) so
that what only reports errors, the keeper's start above all, need not load them. ``openai.ErrorBody``
is the same shape as a model, for validating what others send.
"""

from __future__ import annotations

from typing import Any


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``, keys in that order."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
