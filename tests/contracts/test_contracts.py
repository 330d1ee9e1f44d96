"""OpenAI request models: what is accepted, what is refused, and how the refusal names the field."""

import json

import pytest

from rbee_fleet.common.errors import BadRequest
from rbee_fleet.common.validation import validate
from rbee_fleet.contracts.openai import ChatCompletionRequest, CompletionRequest


def test_chat_request_accepts_unknown_fields_and_text_parts():
    req = validate(ChatCompletionRequest, {
        "model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
        "logit_bias": {}, "tools": None,
    })
    assert req.messages[0].text() == "hi there"
    assert req.unknown_fields() == ["logit_bias", "tools"]


def test_max_completion_tokens_is_max_tokens():
    req = validate(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 7})
    assert req.max_tokens == 7


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "messages": "hello"}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 17}, "n"),
])
def test_chat_request_refusals_name_the_field(body, param):
    with pytest.raises(BadRequest) as info:
        validate(ChatCompletionRequest, body)
    assert info.value.param == param
    assert info.value.status == 400
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_completion_defaults_and_single_prompt():
    req = validate(CompletionRequest, {"model": "m", "prompt": ["one"]})
    assert req.prompt_text() == "one" and req.max_tokens == 16
    with pytest.raises(BadRequest) as info:
        validate(CompletionRequest, {"model": "m", "prompt": ["one", "two"]})
    assert info.value.param == "prompt"
    with pytest.raises(BadRequest):
        validate(CompletionRequest, {"model": "m"})


def test_include_usage_only_when_streaming():
    base = {"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}
    assert not validate(CompletionRequest, base).include_usage()
    assert validate(CompletionRequest, {**base, "stream": True}).include_usage()


def test_worker_ids_cannot_be_paths():
    from rbee_fleet.contracts.fleet import JobRequest

    for bad in ("../../../outside/evil", "a/b", ".hidden", ""):
        with pytest.raises(BadRequest) as info:
            validate(JobRequest, {"operation": {"kind": "worker_spawn", "model": "m", "worker_id": bad}})
        assert info.value.param == "operation.worker_spawn.worker_id"
    ok = validate(JobRequest, {"operation": {"kind": "worker_stop", "worker_id": "home-smollm2-0"}})
    assert ok.operation.worker_id == "home-smollm2-0"


@pytest.mark.parametrize("chat", [True, False])
def test_streamed_chunks_are_the_typed_models_bytes(chat):
    """The worker's fast per-token chunks are exactly what the typed chunk models serialise."""
    from rbee_fleet.contracts.openai import ChatCompletionChunk, CompletionChunk, Usage
    from rbee_fleet.worker.openai_api import ChunkEncoder

    kind = ChatCompletionChunk if chat else CompletionChunk
    enc = ChunkEncoder(chat=chat, id="id-1", created=7, model="smollm2")
    events = [enc.text('a "quoted"\nline'), enc.text("ünï 🐝"), enc.finish("length"), enc.usage(Usage.counted(3, 2))]
    if chat:
        events.insert(0, enc.role())
    parsed = []
    for event in events:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        chunk = kind.model_validate_json(event[6:-2])
        assert json.loads(chunk.model_dump_json()) == json.loads(event[6:-2])
        parsed.append(chunk)
    texts = [c.choices[0].delta.content if chat else c.choices[0].text for c in parsed if c.choices]
    assert "".join(t or "" for t in texts) == 'a "quoted"\nlineünï 🐝'
    assert parsed[-2].choices[0].finish_reason == "length" and parsed[-1].usage.total_tokens == 5
    if chat:
        assert parsed[0].choices[0].delta.role == "assistant"
        assert json.loads(events[-2][6:-2])["choices"][0]["delta"] == {}  # OpenAI's last delta is empty
