"""The worker-to-queen stream: what a worker's SSE stream carries besides OpenAI's chunks.

A worker ends every stream with the SSE comment ``: usage {"prompt_tokens":…}`` just before
``data: [DONE]``: OpenAI clients ignore comments, and the queen reads it to count tokens without parsing
a chunk. A stream that fails after its first byte ends with an error event in OpenAI's error shape
(``data: {"error": {…}}``), which the openai client raises as ``APIError``; the queen writes the same
event when a worker dies mid-answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from rbee_fleet.contracts.errors import error_body

USAGE_COMMENT = "usage "  # the text of the closing comment starts with this
USAGE_MARK = b": " + USAGE_COMMENT.encode()  # the comment as it appears on the wire
ERROR_EVENT_MARK = b'data: {"error"'  # how an error event starts on the wire


def usage_comment(usage: Mapping[str, int]) -> str:
    """The closing comment's text (pass it to ``sse.comment``)."""
    return USAGE_COMMENT + json.dumps(usage, separators=(",", ":"))


def usage_in(tail: bytes) -> dict[str, int] | None:
    """The usage a stream's last bytes report, or None when they carry no (readable) usage comment."""
    at = tail.rfind(USAGE_MARK)
    if at < 0:
        return None
    end = tail.find(b"\n", at)
    try:
        return json.loads(tail[at + len(USAGE_MARK) : end])
    except ValueError:
        return None


def error_event(message: str, *, type: str = "server_error", code: str | None = None) -> bytes:
    """An SSE event carrying an error, as OpenAI clients expect mid-stream."""
    body = error_body(message, type=type, code=code)
    return b"data: " + json.dumps(body).encode() + b"\n\n"
