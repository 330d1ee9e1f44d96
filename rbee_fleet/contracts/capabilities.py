"""What a request needs from the engine that serves it, and the names engines advertise.

Workers list their capabilities in each heartbeat; the queen sends a request only to a worker that has
everything the request needs, and refuses with a 400 naming the field when no worker of the model can
honour it: a field that changes the answer is never silently dropped.
"""

from __future__ import annotations

from typing import Any

CHAT = "chat"  # /v1/chat/completions
COMPLETION = "completion"  # /v1/completions
EMBEDDINGS = "embeddings"  # /v1/embeddings
RESPONSES = "responses"  # /v1/responses (OpenAI's Responses API)
MESSAGES = "messages"  # /v1/messages (Anthropic's Messages API)
TOOLS = "tools"  # tools, tool_choice, parallel_tool_calls
JSON = "json"  # response_format json_object / json_schema
LOGPROBS = "logprobs"  # logprobs, top_logprobs
INFILL = "infill"  # suffix on /v1/completions (fill-in-the-middle)
MULTIPLE = "n"  # n > 1
ECHO = "echo"  # echo on /v1/completions: no engine here offers it

# Workers from before capabilities were reported serve chat and plain completions only.
LEGACY = frozenset({CHAT, COMPLETION})

# What a model's workers will serve, by its file format, before any of them runs: GGUF files run on
# llama-server (everything but embeddings, which a worker offers only when started for them), the GPU
# formats on exllamav2 (chat and plain completions).
LLAMA_SERVER = frozenset({CHAT, COMPLETION, TOOLS, JSON, LOGPROBS, INFILL, MULTIPLE, RESPONSES, MESSAGES})
BY_FORMAT: dict[str, frozenset[str]] = {"gguf": LLAMA_SERVER, "exl2": LEGACY, "safetensors": LEGACY}

# The queen's routes (relative to /v1/) and what each needs.
ENDPOINTS: dict[str, str] = {
    "chat/completions": CHAT,
    "completions": COMPLETION,
    "embeddings": EMBEDDINGS,
    "responses": RESPONSES,
    "messages": MESSAGES,
}


def requirements(endpoint: str, body: dict[str, Any]) -> dict[str, str]:
    """``{capability: the request field that needs it}`` for a parsed request body."""
    needs = {ENDPOINTS[endpoint]: f"/v1/{endpoint}"}
    if endpoint not in ("chat/completions", "completions"):
        return needs
    if body.get("tools") or body.get("tool_choice") not in (None, "none") or body.get("functions"):
        needs[TOOLS] = "tools" if body.get("tools") else ("functions" if body.get("functions") else "tool_choice")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        needs[JSON] = "response_format"
    if body.get("logprobs") or body.get("top_logprobs"):
        needs[LOGPROBS] = "logprobs" if body.get("logprobs") else "top_logprobs"
    if endpoint == "completions" and body.get("suffix"):
        needs[INFILL] = "suffix"
    if endpoint == "completions" and body.get("echo"):
        needs[ECHO] = "echo"
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        needs[MULTIPLE] = "n"
    return needs


def missing(needs: dict[str, str], capabilities: frozenset[str]) -> list[str]:
    """The fields of a request that an engine with ``capabilities`` cannot honour."""
    return [field for cap, field in needs.items() if cap not in capabilities]
