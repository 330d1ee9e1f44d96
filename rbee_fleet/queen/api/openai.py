"""OpenAI (and Anthropic) endpoints of the queen: validate, then hand the untouched body to the proxy."""

from __future__ import annotations

import hmac
import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from rbee_fleet.common.errors import ApiError, BadRequest, Forbidden
from rbee_fleet.common.http import parse_json
from rbee_fleet.common.validation import validate
from rbee_fleet.contracts.capabilities import requirements
from rbee_fleet.contracts.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    MessagesRequest,
    ModelCard,
    ModelList,
    ResponsesRequest,
)
from rbee_fleet.contracts.stream import error_event
from rbee_fleet.queen.api.keys import QUEEN
from rbee_fleet.queen.proxy import PREPARED, ROUTE

# route (under /v1/) -> what its body must at least hold
REQUESTS: dict[str, type[BaseModel]] = {
    "chat/completions": ChatCompletionRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
    "responses": ResponsesRequest,
    "messages": MessagesRequest,
}


# How each API names the answer's token budget.
MAX_TOKEN_FIELDS = ("max_tokens", "max_output_tokens")
# Operators (the cluster token) may pin a request to one hive's workers: a deploy's health gate tests a host.
PIN_HEADER = "X-Rbee-Hive"


def _pinned_hive(request: web.Request, token: str | None) -> str | None:
    hive = request.headers.get(PIN_HEADER)
    if hive is None:
        return None
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not token or not hmac.compare_digest(given.encode(), token.encode()):
        raise Forbidden(f"{PIN_HEADER} is for the fleet's operators: it needs the cluster token")
    return hive


def _handler(endpoint: str):
    model_cls = REQUESTS[endpoint]

    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = parse_json(raw)
        req = validate(model_cls, body)
        if isinstance(body.get("tool_choice"), dict):
            raw = _name_the_only_tool(body)
        queen = request.app[QUEEN]
        hive = _pinned_hive(request, queen.settings.cluster_token)
        for param in MAX_TOKEN_FIELDS:
            value = getattr(req, param, None) if param != "max_output_tokens" else body.get(param)
            if isinstance(value, int):
                queen.registry.refuse_over_context(req.model, value, param)
                break
        stream = bool(getattr(req, "stream", False))
        if queen.settings.prefix_routing:
            hashes = queen.router.hashes(endpoint, body)
            if hashes:
                request[ROUTE] = queen.router.route(req.model, hashes)
        try:
            await queen.on_demand.hold(request, req.model, stream)
            if endpoint == "completions" and body.get("suffix"):
                raw = _fill_in_the_middle(body, queen.registry.fim_tokens(req.model)) or raw
            response = await queen.proxy.forward(
                request, endpoint=endpoint, model=req.model, stream=stream, body=raw,
                needs=requirements(endpoint, body), hive=hive,
            )
        except ApiError as exc:
            prepared = request.get(PREPARED)
            if prepared is None:
                raise
            await prepared.write(error_event(exc.message, type=exc.type, code=exc.code))
            await prepared.write_eof()
            return prepared
        prepared = request.get(PREPARED)
        if prepared is not None and response is not prepared:
            # The SSE stream had started while a model loaded; the worker then refused the request.
            await prepared.write(b"data: " + bytes(getattr(response, "body", b"") or b"{}") + b"\n\n")
            await prepared.write_eof()
            return prepared
        return response

    return handle


def _name_the_only_tool(body: dict[str, Any]) -> bytes:
    """``tool_choice`` naming one function, as "required" with that function alone: the same contract,
    in the form every engine honours (llama-server reads only the string forms)."""
    choice = body["tool_choice"]
    name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise BadRequest("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                         "\"function\": {\"name\": ...}}", param="tool_choice")
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and (t.get("function") or {}).get("name") == name]
    if not tools:
        raise BadRequest(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    return json.dumps({**body, "tool_choice": "required", "tools": tools}).encode()


def _fill_in_the_middle(body: dict[str, Any], markers: list[str] | None) -> bytes | None:
    """``prompt`` and ``suffix`` as one fill-in-the-middle prompt in the model's own markers (prefix, suffix,
    middle: the order llama.cpp's infill uses), so the answer is the text that goes between them. None when
    no worker of the model has markers: the proxy then refuses ``suffix`` by name."""
    if not markers:
        return None
    pre, suf, mid = markers
    suffix = body["suffix"]
    if not isinstance(suffix, str):
        raise BadRequest("suffix must be a string", param="suffix")
    prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
    filled = [f"{pre}{prompt}{suf}{suffix}{mid}" for prompt in prompts]
    rest = {k: v for k, v in body.items() if k != "suffix"}
    return json.dumps({**rest, "prompt": filled if isinstance(body["prompt"], list) else filled[0]}).encode()


async def models(request: web.Request) -> web.Response:
    queen = request.app[QUEEN]
    created = int(queen.started_at)
    cards = ModelList(data=[
        ModelCard(id=v.id, created=created, capabilities=v.capabilities, state=v.state, workers=v.workers, hives=v.hives,
                  devices=v.devices)
        for v in queen.on_demand.views()
    ])
    return web.json_response(cards.model_dump())


def add_routes(app: web.Application) -> None:
    for endpoint in REQUESTS:
        app.router.add_post(f"/v1/{endpoint}", _handler(endpoint))
    app.router.add_get("/v1/models", models)
