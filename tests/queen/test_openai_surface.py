"""The whole OpenAI surface through a real queen onto real llama-server workers, with the clients users use.

One worker serves chat and completions with 4 slots; a second, declared with ``embeddings = true``,
serves embeddings. Requests go through the queen with the official ``openai`` client and LangChain.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import jsonschema
import openai
import pytest

from tests.support import procs

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]


@pytest.fixture(scope="module")
def fleet(module_tmp):
    port = procs.free_port()
    inv = procs.write_inventory(module_tmp / "fleet.toml", port=port, worker_port_base=procs.free_port_range(10),
                                workers=[{"model": "smollm2", "name": "chat", "slots": 4, "ctx_size": 2048},
                                         {"model": "smollm2", "name": "embed", "embeddings": True, "slots": 1,
                                          "ctx_size": 512}],
                                queen_extra="pulse_timeout_s = 10.0")
    # Not a liveness test (see test_drain.py): a worker starved of CPU for the tests' 2-second heartbeat
    # timeout must not drop out of rotation in the middle of a timing check.
    inv.write_text(inv.read_text().replace("heartbeat_timeout_s = 2.0", "heartbeat_timeout_s = 10.0"))
    queen = procs.start_queen(module_tmp, inv, module_tmp / "home", port)
    procs.wait_workers_ready(queen, 2)
    yield queen
    queen.stop()
    assert queen.popen.returncode == 0, queen.log_text()[-3000:]


@pytest.fixture
def client(fleet):
    return openai.AsyncOpenAI(base_url=f"{fleet.url}/v1", api_key="unused-on-loopback", max_retries=0)


async def test_models_say_what_they_support(client):
    models = await client.models.list()
    card = {m.id: m for m in models.data}["smollm2"]
    assert {"chat", "completion", "tools", "json", "embeddings", "logprobs", "n"} <= set(card.capabilities)
    assert "infill" not in card.capabilities


async def test_tool_call_not_streamed(client):
    resp = await client.chat.completions.create(model="smollm2", messages=ASK_WEATHER, tools=[WEATHER_TOOL],
                                                tool_choice="required", temperature=0, max_tokens=100)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments), dict)


async def test_tool_call_streamed(client):
    stream = await client.chat.completions.create(model="smollm2", messages=ASK_WEATHER, tools=[WEATHER_TOOL],
                                                  tool_choice="required", temperature=0, max_tokens=100, stream=True)
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:  # parallel calls are allowed: one entry per index
                if call.function and call.function.name:
                    names[call.index] = call.function.name
                if call.function and call.function.arguments:
                    arguments[call.index] = arguments.get(call.index, "") + call.function.arguments
            finish = choice.finish_reason or finish
    assert names and set(names.values()) == {"get_weather"} and finish == "tool_calls"
    assert all(isinstance(json.loads(arguments[i]), dict) for i in names)


async def _tool_calls(client, stream: bool, **extra) -> list[tuple[str, str]]:
    """(name, arguments) of each tool call in the answer, streamed or not."""
    resp = await client.chat.completions.create(model="smollm2", messages=ASK_WEATHER, tools=[WEATHER_TOOL],
                                                tool_choice="required", temperature=0, max_tokens=100,
                                                stream=stream, **extra)
    if not stream:
        return [(c.function.name, c.function.arguments) for c in resp.choices[0].message.tool_calls or []]
    calls: dict[int, list[str]] = {}
    async for chunk in resp:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                name, args = calls.setdefault(call.index, ["", ""])
                calls[call.index] = [name + (call.function.name or ""), args + (call.function.arguments or "")]
    return [(name, args) for name, args in (calls[i] for i in sorted(calls))]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_parallel_tool_calls_false_means_at_most_one_call(client, stream):
    # SmolLM2 answers this with two calls when it may (OpenAI's default, and parallel_tool_calls=True);
    # with parallel_tool_calls=False the engine's grammar stops after the first.
    allowed = await _tool_calls(client, stream, parallel_tool_calls=True)
    assert len(allowed) >= 2 and {name for name, _ in allowed} == {"get_weather"}, allowed
    one = await _tool_calls(client, stream, parallel_tool_calls=False)
    assert len(one) == 1 and one[0][0] == "get_weather", one
    assert isinstance(json.loads(one[0][1]), dict)


async def test_json_object_and_strict_json_schema(client):
    resp = await client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Reply with a JSON object whose key city is Paris."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    assert resp.choices[0].finish_reason == "stop", resp.choices[0].message.content
    assert isinstance(json.loads(resp.choices[0].message.content), dict)
    resp = await client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Invent a person: name and age."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "strict": True, "schema": PERSON_SCHEMA}},
        temperature=0, max_tokens=80)
    person = json.loads(resp.choices[0].message.content)
    jsonschema.validate(person, PERSON_SCHEMA)


async def test_embeddings_of_two_inputs(client):
    resp = await client.embeddings.create(model="smollm2", input=["a bee in a hive", "a worker bee"])
    assert [d.index for d in resp.data] == [0, 1]
    a, b = (d.embedding for d in resp.data)
    assert len(a) == len(b) == 576 and a != b  # SmolLM2-135M's hidden size
    assert resp.usage.prompt_tokens > 0


async def test_logprobs(client):
    resp = await client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                                logprobs=True, top_logprobs=3, max_tokens=5, temperature=0)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)


async def test_suffix_is_refused_not_ignored(client):
    # SmolLM2 has no fill-in-the-middle tokens (tests/queen/test_fill_in_the_middle.py: a model that has them).
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model="smollm2", prompt="def add(a, b):", suffix="\n", max_tokens=4)
    assert info.value.body["param"] == "suffix" and info.value.body["code"] == "unsupported_parameter"


async def test_responses_api(client):
    resp = await client.responses.create(model="smollm2", input="Say hello.", max_output_tokens=16)
    assert resp.output_text.strip()
    stream = await client.responses.create(model="smollm2", input="Say hello.", max_output_tokens=8, stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[-1] == "response.completed" and "response.output_text.delta" in kinds


async def test_anthropic_messages_api(fleet):
    body = {"model": "smollm2", "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{fleet.url}/v1/messages", json=body) as resp:
            assert resp.status == 200
            answer = await resp.json()
    assert answer["type"] == "message" and answer["content"][0]["text"]


async def test_n_two_choices(client):
    resp = await client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                                n=2, max_tokens=5)
    assert [c.index for c in resp.choices] == [0, 1]


def test_langchain_structured_output_and_bind_tools(fleet):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    llm = ChatOpenAI(model="smollm2", base_url=f"{fleet.url}/v1", api_key="unused", temperature=0, max_tokens=80,
                     max_retries=0)
    person = llm.with_structured_output(Person, method="json_schema").invoke("Invent a person: name and age.")
    assert isinstance(person, Person)

    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"


async def test_four_streams_start_together_on_a_worker_with_four_slots(client, fleet):
    async def first_token_after(i: int) -> float:
        started = time.monotonic()
        stream = await client.completions.create(model="smollm2", stream=True, max_tokens=60, temperature=0,
                                                 prompt=f"{i}, {i + 1}, {i + 2}, {i + 3},")  # four users, four prompts
        async for _ in stream:
            break
        took = time.monotonic() - started
        async for _ in stream:
            pass
        return took

    firsts = await asyncio.gather(*(first_token_after(i) for i in range(4)))
    assert max(firsts) < 1.0, f"times to first token: {firsts}"


async def test_a_field_no_worker_can_honour_is_refused_naming_it(fleet):
    # The embeddings endpoint on a model whose every worker lacks it: shown with a fleet of one kind.
    status, body, _ = procs.http_json(f"{fleet.url}/v1/completions", method="POST",
                                      body={"model": "smollm2", "prompt": "x", "echo": True})
    assert status == 400 and body["error"]["param"] == "echo" and body["error"]["code"] == "unsupported_parameter"
    assert "llamacpp" in body["error"]["message"]


async def test_context_overflow_through_the_queen_is_openai_shaped(fleet):
    status, body, _ = procs.http_json(f"{fleet.url}/v1/completions", method="POST",
                                      body={"model": "smollm2", "prompt": "bee " * 3000, "max_tokens": 4})
    assert status == 400, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "context_length_exceeded"
