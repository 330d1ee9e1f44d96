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

from rbee_fleet.contracts.openai import error_body

USAGE_COMMENT = "usage "  # the text of the closing comment starts with this
USAGE_MARK = b": " + USAGE_COMMENT.encode()  # the comment as it appears on the wire
ERROR_EVENT_MARK = b'data: {"error"'  # how an error event starts on the wire


def usage_comment(usage: Mapping[str, int]) -> str:
    """The closing comment's text (pass it to ``sse.comment``)."""
    return USAGE_COMMENT + json.dumps(usage, separators=(",", ":"))


def usage_in(tail: bytes) -> dict[str, int] | None:
    """The usage a stream's last bytes report: the closing comment of rbee-fleet's own workers, else an
    OpenAI ``usage`` object or llama-server's ``timings`` (on its final chunk, asked for or not) in the
    last data events; None when there is none."""
    at = tail.rfind(USAGE_MARK)
    if at >= 0:
        end = tail.find(b"\n", at)
        try:
            return json.loads(tail[at + len(USAGE_MARK) : end])
        except ValueError:
            return None
    for event in reversed(tail.split(b"\n\n")):
        for line in event.split(b"\n"):
            if line.startswith(b"data: {"):
                found = _usage_of_chunk(line[6:])
                if found is not None:
                    return found
    return None


def _usage_of_chunk(raw: bytes) -> dict[str, int] | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    if isinstance(usage, dict) and "completion_tokens" in usage:
        return usage
    timings = data.get("timings")
    if isinstance(timings, dict) and "predicted_n" in timings:
        prompt = int(timings.get("prompt_n", 0)) + int(timings.get("cache_n", 0))
        completion = int(timings["predicted_n"])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return None


def error_event(message: str, *, type: str = "server_error", code: str | None = None) -> bytes:
    """An SSE event carrying an error, as OpenAI clients expect mid-stream."""
    body = error_body(message, type=type, code=code)
    return b"data: " + json.dumps(body).encode() + b"\n\n"
