"""How the queen serves one OpenAI (or Anthropic) request, from the parsed body to the worker's bytes.

Built once at start-up. The handler only reads and validates the body; ``Serving.serve`` then decides
everything else, in this order, each step in one place:

1. rewrites: ``tool_choice`` naming one function becomes "required" with that function alone (the form
   every engine honours), ``suffix`` becomes a fill-in-the-middle prompt in the model's own markers;
2. pinning: ``X-Rbee-Hive`` (operators only) keeps the request on one hive's workers;
3. the context check: a ``max_tokens`` as large as every worker's context is a 400 before anything runs;
4. routing: the prefix router's choice among the workers that could take it, when prefix routing is on;
5. on-demand holding: a model in a catalog but on no worker is loaded first (a streamed request gets
   SSE keep-alives meanwhile, in a response already started);
6. the proxy places it on a worker and relays the answer.

What these steps decide travels to the proxy as one ``Dispatch``, never as keys on the request.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from rbee_fleet.common.errors import ApiError, BadRequest, Forbidden
from rbee_fleet.contracts.capabilities import requirements
from rbee_fleet.contracts.stream import error_event
from rbee_fleet.contracts.vocabulary import PIN_HEADER
from rbee_fleet.queen.on_demand import OnDemand, StreamEnded
from rbee_fleet.queen.prefix_routing import PrefixRouter
from rbee_fleet.queen.proxy import Dispatch, WorkerProxy
from rbee_fleet.queen.registry import Registry

# How each API names the answer's token budget.
MAX_TOKEN_FIELDS = ("max_tokens", "max_output_tokens")


@dataclass(frozen=True)
class Policy:
    """The settings serving reads (from the queen's settings)."""

    cluster_token: str | None
    prefix_routing: bool


class Serving:
    def __init__(self, policy: Policy, registry: Registry, router: PrefixRouter, on_demand: OnDemand,
                 proxy: WorkerProxy) -> None:
        self.policy = policy
        self.registry = registry
        self.router = router
        self.on_demand = on_demand
        self.proxy = proxy

    async def serve(self, request: web.Request, endpoint: str, req: BaseModel, body: dict[str, Any],
                    raw: bytes) -> web.StreamResponse:
        """Answer a validated request: ``req`` is its model, ``body`` the parsed JSON, ``raw`` its bytes."""
        model = str(req.model)
        if isinstance(body.get("tool_choice"), dict):
            raw = name_the_only_tool(body)
        hive = self._pinned_hive(request)
        self._check_context(model, req, body)
        stream = bool(getattr(req, "stream", False))
        route = None
        if self.policy.prefix_routing:
            hashes = self.router.hashes(endpoint, body)
            if hashes:
                route = self.router.route(model, hashes)
        try:
            started = await self.on_demand.hold(request, model, stream)
        except StreamEnded as ended:
            return ended.response
        if endpoint == "completions" and body.get("suffix"):
            raw = fill_in_the_middle(body, self.registry.fim_tokens(model)) or raw
        dispatch = Dispatch(endpoint=endpoint, model=model, stream=stream, body=raw,
                            needs=requirements(endpoint, body), hive=hive, route=route, started=started)
        try:
            response = await self.proxy.forward(request, dispatch)
        except ApiError as exc:
            if started is None:
                raise
            # The SSE stream began while the model loaded: the error goes into it.
            await started.write(error_event(exc.message, type=exc.type, code=exc.code))
            await started.write_eof()
            return started
        if started is not None and response is not started:
            # The stream began while the model loaded; then the worker refused the request.
            await started.write(b"data: " + bytes(getattr(response, "body", b"") or b"{}") + b"\n\n")
            await started.write_eof()
            return started
        return response

    def _pinned_hive(self, request: web.Request) -> str | None:
        hive = request.headers.get(PIN_HEADER)
        if hive is None:
            return None
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        token = self.policy.cluster_token
        if not token or not hmac.compare_digest(given.encode(), token.encode()):
            raise Forbidden(f"{PIN_HEADER} is for the fleet's operators: it needs the cluster token")
        return hive

    def _check_context(self, model: str, req: BaseModel, body: dict[str, Any]) -> None:
        for param in MAX_TOKEN_FIELDS:
            value = getattr(req, param, None) if param != "max_output_tokens" else body.get(param)
            if isinstance(value, int):
                self.registry.refuse_over_context(model, value, param)
                return


def name_the_only_tool(body: dict[str, Any]) -> bytes:
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


def fill_in_the_middle(body: dict[str, Any], markers: list[str] | None) -> bytes | None:
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
