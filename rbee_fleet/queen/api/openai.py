"""OpenAI (and Anthropic) endpoints of the queen: read and validate the body; ``queen.serving`` does the rest."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel

from rbee_fleet.common.http import parse_json
from rbee_fleet.common.validation import validate
from rbee_fleet.contracts.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    MessagesRequest,
    ModelCard,
    ModelList,
    ResponsesRequest,
)
from rbee_fleet.queen.api.keys import QUEEN

# route (under /v1/) -> what its body must at least hold
REQUESTS: dict[str, type[BaseModel]] = {
    "chat/completions": ChatCompletionRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
    "responses": ResponsesRequest,
    "messages": MessagesRequest,
}


def _handler(endpoint: str):
    model_cls = REQUESTS[endpoint]

    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = parse_json(raw)
        req = validate(model_cls, body)
        return await request.app[QUEEN].serving.serve(request, endpoint, req, body, raw)

    return handle


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
