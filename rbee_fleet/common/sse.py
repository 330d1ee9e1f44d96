"""Server-sent events: the one encoder and the one decoder used by every component."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import StreamReader, web

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def encode(data: Any) -> bytes:
    """One ``data:`` event holding ``data`` as JSON (or as is, when it is already a string)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return b"data: " + payload.encode() + b"\n\n"


def comment(text: str) -> bytes:
    """An SSE comment line: ignored by clients, readable by the queen."""
    return b": " + text.encode() + b"\n\n"


async def start_stream(request: web.Request, status: int = 200) -> web.StreamResponse:
    response = web.StreamResponse(status=status, headers=SSE_HEADERS)
    await response.prepare(request)
    return response


async def iter_events(content: StreamReader) -> AsyncIterator[str]:
    """Yield the ``data`` of each event of an SSE body (comments skipped, ``[DONE]`` included)."""
    data_lines: list[str] = []
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data_lines:
                yield "\n".join(data_lines)
                data_lines = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data_lines.append(value[1:] if value.startswith(" ") else value)
    if data_lines:
        yield "\n".join(data_lines)
