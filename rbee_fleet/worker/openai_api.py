"""The worker's OpenAI endpoints: validate, admit, generate, and stream chunks as they come."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from aiohttp import web

from rbee_fleet.common import sse
from rbee_fleet.common.errors import BadRequest, ContextOverflow
from rbee_fleet.common.http import read_json
from rbee_fleet.common.validation import validate
from rbee_fleet.contracts.capabilities import missing, requirements
from rbee_fleet.contracts.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    SamplingFields,
    Usage,
)
from rbee_fleet.contracts.stream import error_event, usage_comment
from rbee_fleet.worker.admission import Admission
from rbee_fleet.worker.backends.base import Backend, Finish, Piece, SamplingParams
from rbee_fleet.worker.runtime import Runtime

log = logging.getLogger(__name__)

RUNTIME = web.AppKey("runtime", Runtime)


class ChunkEncoder:
    """Streamed chunks, as the typed models in ``contracts.openai`` serialise them.

    A token's chunk is the model's own serialisation with the text spliced in: the bytes around a
    placeholder are rendered once per request, so each token costs one ``json.dumps`` of a short string.
    """

    _SLOT = "rbee-text-slot"

    def __init__(self, *, chat: bool, id: str, created: int, model: str) -> None:
        self.chat = chat
        self._head = {"id": id, "created": created, "model": model}
        template = self._chunk(self._SLOT, finish=None).encode()
        self._pre, self._post = template.split(json.dumps(self._SLOT).encode())

    def _chunk(self, text: str, *, finish: str | None, role: bool = False) -> str:
        if self.chat:
            delta = ChatDelta(role="assistant" if role else None, content=None if finish else text)
            return ChatCompletionChunk(**self._head, choices=[
                ChatChunkChoice(delta=delta, finish_reason=finish)]).model_dump_json()
        return CompletionChunk(**self._head, choices=[
            CompletionChunkChoice(text=text, finish_reason=finish)]).model_dump_json()

    def text(self, text: str) -> bytes:
        return b"data: " + self._pre + json.dumps(text).encode() + self._post + b"\n\n"

    def role(self) -> bytes:
        return sse.encode(self._chunk("", finish=None, role=True))

    def finish(self, reason: str) -> bytes:
        return sse.encode(self._chunk("", finish=reason))

    def usage(self, usage: Usage) -> bytes:
        kind = ChatCompletionChunk if self.chat else CompletionChunk
        return sse.encode(kind(**self._head, choices=[], usage=usage).model_dump_json())


def sampling_params(req: SamplingFields, prompt_tokens: int, backend: Backend) -> SamplingParams:
    """Check the request against the model's context, before anything is queued or streamed."""
    ctx = backend.context_length
    if prompt_tokens >= ctx:
        raise ContextOverflow(
            f"the prompt is {prompt_tokens} tokens, more than this model's context of {ctx} tokens",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
        )
    room = ctx - prompt_tokens
    if req.max_tokens is not None and req.max_tokens > room:
        raise ContextOverflow(
            f"max_tokens is {req.max_tokens}, but the prompt ({prompt_tokens} tokens) leaves room for "
            f"{room} in this model's context of {ctx} tokens",
            param="max_tokens",
        )
    max_tokens = req.max_tokens if req.max_tokens is not None else room
    backend.check_budget(prompt_tokens, max_tokens)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=tuple(req.stop_list()),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
    )


def _log_unknown(req: SamplingFields) -> None:
    unknown = req.unknown_fields()
    if unknown:
        log.debug("ignoring unknown request fields: %s", ", ".join(unknown))


def _refuse_unsupported(endpoint: str, body: dict[str, Any], backend: Backend) -> None:
    """A field this backend cannot honour is refused, never ignored."""
    fields = missing(requirements(endpoint, body), backend.capabilities)
    if fields:
        raise BadRequest(f"'{fields[0]}' is not supported by the {backend.name} backend",
                         param=fields[0], code="unsupported_parameter")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    body = await read_json(request)
    req = validate(ChatCompletionRequest, body)
    _log_unknown(req)
    backend, admission = runtime.serving(req.model)
    _refuse_unsupported("chat/completions", body, backend)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    prompt = backend.tokenize(backend.render_chat(messages), templated=True)
    params = sampling_params(req, len(prompt), backend)
    encoder = ChunkEncoder(chat=True, id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=req.model)
    return await _generate(request, runtime, backend, admission, req, prompt, params, encoder)


async def completions(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    body = await read_json(request)
    req = validate(CompletionRequest, body)
    _log_unknown(req)
    backend, admission = runtime.serving(req.model)
    _refuse_unsupported("completions", body, backend)
    prompt = backend.tokenize(req.prompt_text(), templated=False)
    if not prompt:
        raise BadRequest("the prompt is empty", param="prompt")
    params = sampling_params(req, len(prompt), backend)
    encoder = ChunkEncoder(chat=False, id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=req.model)
    return await _generate(request, runtime, backend, admission, req, prompt, params, encoder)


async def _generate(
    request: web.Request,
    runtime: Runtime,
    backend: Backend,
    admission: Admission,
    req: SamplingFields,
    prompt: list[int],
    params: SamplingParams,
    encoder: ChunkEncoder,
) -> web.StreamResponse:
    async with admission.slot():
        runtime.requests_total += 1
        stream = backend.stream(prompt, params)
        try:
            if req.stream:
                return await _stream_out(request, runtime, stream, encoder, len(prompt), req.include_usage())
            return await _collect(runtime, stream, encoder, len(prompt), req.model)
        finally:
            await stream.aclose()


async def _collect(runtime: Runtime, stream: Any, encoder: ChunkEncoder, prompt_tokens: int, model: str) -> web.Response:
    parts: list[str] = []
    finish = Finish("stop", 0)
    async for item in stream:
        if isinstance(item, Piece):
            parts.append(item.text)
            runtime.meter.add(item.tokens)
        else:
            finish = item
    usage = Usage.counted(prompt_tokens, finish.completion_tokens)
    text, created = "".join(parts), int(time.time())
    body: ChatCompletion | Completion
    if encoder.chat:
        body = ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=created, model=model, usage=usage,
                              choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=finish.reason)])
    else:
        body = Completion(id=f"cmpl-{uuid.uuid4().hex}", created=created, model=model, usage=usage,
                          choices=[CompletionChoice(text=text, finish_reason=finish.reason)])
    return web.json_response(text=body.model_dump_json())


async def _stream_out(
    request: web.Request,
    runtime: Runtime,
    stream: Any,
    encoder: ChunkEncoder,
    prompt_tokens: int,
    include_usage: bool,
) -> web.StreamResponse:
    # Wait for the first piece before sending headers, so that a failure up to here is a plain
    # HTTP error and the first byte the client sees is the first token.
    meter = runtime.meter
    first = await stream.__anext__()
    response = await sse.start_stream(request)
    head = encoder.role() if encoder.chat else b""
    finish: Finish | None = None
    item: Piece | Finish = first
    try:
        while True:
            if isinstance(item, Finish):
                finish = item
                break
            meter.add(item.tokens)
            if item.text:
                await response.write(head + encoder.text(item.text))
                head = b""
            item = await stream.__anext__()
    except (ConnectionResetError, asyncio.CancelledError):
        raise  # the client is gone: nothing to tell it
    except Exception as exc:  # noqa: BLE001 - headers are out: report in-band, as OpenAI clients expect
        log.exception("generation failed mid-stream")
        await response.write(head + error_event(f"generation failed: {exc}", code="generation_failed"))
        await response.write_eof()
        return response
    if head:
        await response.write(head)
    usage = Usage.counted(prompt_tokens, finish.completion_tokens)
    tail = encoder.finish(finish.reason)
    if include_usage:
        tail += encoder.usage(usage)
    tail += sse.comment(usage_comment(usage.model_dump())) + sse.DONE
    await response.write(tail)
    await response.write_eof()
    return response
