"""OpenAI endpoints of the queen: validate, then hand the untouched body to the proxy."""

from __future__ import annotations

from aiohttp import web

from rbee_fleet.common.http import parse_json
from rbee_fleet.common.validation import validate
from rbee_fleet.contracts.openai import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from rbee_fleet.queen.api.keys import QUEEN


async def chat_completions(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    req = validate(ChatCompletionRequest, parse_json(raw))
    return await request.app[QUEEN].proxy.forward(
        request, endpoint="chat/completions", model=req.model, stream=req.stream, body=raw
    )


async def completions(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    req = validate(CompletionRequest, parse_json(raw))
    return await request.app[QUEEN].proxy.forward(
        request, endpoint="completions", model=req.model, stream=req.stream, body=raw
    )


async def models(request: web.Request) -> web.Response:
    queen = request.app[QUEEN]
    created = int(queen.started_at)
    cards = ModelList(data=[ModelCard(id=m, created=created) for m in queen.registry.models()])
    return web.json_response(cards.model_dump())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
