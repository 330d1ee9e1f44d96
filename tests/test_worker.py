"""A real worker process running real llama.cpp on SmolLM2, used on its own with the official openai client."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from tests.support import procs

CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
STORY = [{"role": "user", "content": "Tell me a long story about a bee."}]


@pytest.fixture
def client(standalone_worker):
    return openai.AsyncOpenAI(base_url=f"{standalone_worker.url}/v1", api_key="unused", max_retries=0)


def health(worker) -> dict:
    return procs.http_json(f"{worker.url}/health")[1]


async def test_health_reports_the_loaded_model(standalone_worker):
    body = health(standalone_worker)
    assert body["state"] == "ready" and body["model"] == "smollm2" and body["backend"] == "llamacpp"
    assert body["context_length"] == 512 and body["slots_total"] == 1 and body["queue_capacity"] == 1


async def test_chat_non_stream_and_stream_agree(client):
    full = await client.chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=40)
    text = full.choices[0].message.content
    assert "Paris" in text
    assert full.choices[0].finish_reason == "stop"  # the model ended by itself, before max_tokens
    assert full.usage.completion_tokens < 40 and full.usage.prompt_tokens > 10
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    parts, finish, usage = [], None, None
    stream = await client.chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=40,
                                                  stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(parts) == text
    assert finish == "stop"
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


async def test_max_tokens_gives_length_and_exact_usage(client):
    resp = await client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=7, temperature=0)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 7
    assert resp.choices[0].text.strip()


async def test_stop_sequence_cuts_the_answer(client):
    base = await client.completions.create(model="smollm2", prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0)
    text = base.choices[0].text
    assert "5" in text, text
    cut = await client.completions.create(model="smollm2", prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0,
                                          stop=["5"])
    assert cut.choices[0].text == text[: text.index("5")]
    assert cut.choices[0].finish_reason == "stop"
    streamed = []
    stream = await client.completions.create(model="smollm2", prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0,
                                             stop=["5"], stream=True)
    async for chunk in stream:
        streamed.append(chunk.choices[0].text)
    assert "".join(streamed) == cut.choices[0].text


async def test_seed_makes_sampling_repeatable(client):
    async def sample(seed: int) -> str:
        r = await client.chat.completions.create(model="smollm2", messages=STORY, temperature=1.0, top_p=0.95,
                                                 seed=seed, max_tokens=24)
        return r.choices[0].message.content

    assert await sample(1234) == await sample(1234)


async def test_disconnect_cancels_generation_within_a_few_tokens(standalone_worker):
    before = health(standalone_worker)["tokens_decoded_total"]
    received = 0
    body = {"model": "smollm2", **procs.LONG, "max_tokens": 400, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{standalone_worker.url}/v1/completions", json=body) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    received += 1
                    if received == 6:
                        break
    await asyncio.sleep(1.0)  # ~100 tokens' worth of time at this model's speed
    decoded = health(standalone_worker)["tokens_decoded_total"] - before
    assert decoded <= received + 4, f"{decoded} tokens decoded for {received} chunks read"
    h = health(standalone_worker)
    assert h["slots_busy"] == 0 and h["queue_depth"] == 0


async def test_full_queue_answers_429_with_retry_after(standalone_worker):
    """The fixture worker has 1 slot and a queue of 1: a third concurrent request is refused."""
    body = {"model": "smollm2", **procs.LONG, "max_tokens": 400, "stream": True}
    async with aiohttp.ClientSession() as session:
        async def hold() -> int:
            async with session.post(f"{standalone_worker.url}/v1/completions", json=body) as resp:
                if resp.status == 200:
                    await resp.content.readline()  # stream started: hold the slot until cancelled
                    await asyncio.sleep(30)
                return resp.status

        holders = [asyncio.create_task(hold()) for _ in range(2)]
        await asyncio.sleep(0.5)
        assert health(standalone_worker)["queue_depth"] == 1
        async with session.post(f"{standalone_worker.url}/v1/completions", json=body) as resp:
            status, payload, retry_after = resp.status, await resp.json(), resp.headers.get("Retry-After")
        for task in holders:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    assert status == 429
    assert payload["error"]["type"] == "rate_limit_error" and payload["error"]["code"] == "queue_full"
    assert retry_after is not None and int(retry_after) >= 1
    procs.wait_until(lambda: health(standalone_worker)["slots_busy"] == 0, 10, what="the slot to free")


def _post_raw(url: str, data: bytes | str, method: str = "POST") -> tuple[int, dict]:
    status, body, _ = procs.http_json(url, method=method, body=data.encode() if isinstance(data, str) else data)
    return status, body


BAD_INPUTS = [
    ("malformed JSON", "/v1/chat/completions", '{"model": "smollm2", "messages": [', 400, None),
    ("not an object", "/v1/chat/completions", "[1, 2]", 400, None),
    ("missing messages", "/v1/chat/completions", '{"model": "smollm2"}', 400, "messages"),
    ("missing prompt", "/v1/completions", '{"model": "smollm2"}', 400, "prompt"),
    ("wrong type", "/v1/chat/completions", '{"model": "smollm2", "messages": [{"role": "user", "content": 5}]}', 400, None),
    ("negative max_tokens", "/v1/completions", '{"model": "smollm2", "prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
    ("huge max_tokens", "/v1/completions", '{"model": "smollm2", "prompt": "x", "max_tokens": 100000}', 400, "max_tokens"),
    ("unknown model", "/v1/completions", '{"model": "gpt-9", "prompt": "x"}', 404, "model"),
]


@pytest.mark.parametrize("label, path, data, status, param", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_clear_4xx(standalone_worker, label, path, data, status, param):
    got, body = _post_raw(standalone_worker.url + path, data)
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param:
        assert body["error"]["param"] == param
    if status == 404:
        assert body["error"]["code"] == "model_not_found"


def test_prompt_longer_than_context_is_400_before_streaming(standalone_worker):
    long_prompt = "bee " * 700  # more than the fixture's 512-token context
    got, body = _post_raw(standalone_worker.url + "/v1/completions",
                          json.dumps({"model": "smollm2", "prompt": long_prompt, "stream": True}))
    assert got == 400 and body["error"]["code"] == "context_length_exceeded" and body["error"]["param"] == "prompt"
    got, body = _post_raw(standalone_worker.url + "/v1/completions",
                          json.dumps({"model": "smollm2", "prompt": "hi", "max_tokens": 600}))
    assert got == 400 and body["error"]["param"] == "max_tokens"


def test_wrong_method_path_and_oversized_body(standalone_worker):
    status, body, headers = procs.http_json(standalone_worker.url + "/v1/chat/completions")
    assert status == 405 and body["error"]["code"] == "method_not_allowed" and "POST" in headers.get("Allow", "")
    status, body, _ = procs.http_json(standalone_worker.url + "/v1/nothing-here")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    huge = json.dumps({"model": "smollm2", "prompt": "x" * (5 * 2**20)})
    got, body = _post_raw(standalone_worker.url + "/v1/completions", huge)
    assert got == 413 and body["error"]["code"] == "request_too_large"


def test_worker_keeps_serving_after_bad_input(standalone_worker):
    for _, path, data, _, _ in BAD_INPUTS:
        _post_raw(standalone_worker.url + path, data)
    status, body, _ = procs.http_json(standalone_worker.url + "/v1/completions",
                                      method="POST", body={"model": "smollm2", "prompt": "Hello", "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_worker_with_a_token_refuses_callers_without_it(tmp_path):
    from rbee_fleet.common.secrets import write_secret

    token_file = tmp_path / "cluster.token"
    write_secret(token_file, "s3cret-token-value")
    assert token_file.stat().st_mode & 0o777 == 0o600
    worker = procs.start_worker(tmp_path, token_file=str(token_file))
    try:
        status, body, _ = procs.http_json(worker.url + "/health")
        assert status == 401 and body["error"]["type"] == "authentication_error"
        status, _, _ = procs.http_json(worker.url + "/health", headers={"Authorization": "Bearer wrong"})
        assert status == 401
        status, body, _ = procs.http_json(worker.url + "/health", headers={"Authorization": "Bearer s3cret-token-value"})
        assert status == 200 and body["state"] == "ready"
        assert "s3cret-token-value" not in worker.log_text()
    finally:
        worker.stop()
    assert worker.popen.returncode == 0, worker.log_text()[-2000:]


def test_a_worker_beyond_loopback_without_a_token_refuses_to_start(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "rbee_fleet.worker", "--model-path", procs.model_path(),
                           "--model-id", "smollm2", "--host", "0.0.0.0", "--port", str(procs.free_port())],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "without a cluster token" in done.stderr
    done = subprocess.run([sys.executable, "-m", "rbee_fleet.hive", "--host", "0.0.0.0", "--port", str(procs.free_port()),
                           "--home", str(tmp_path / "h")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "without a cluster token" in done.stderr
