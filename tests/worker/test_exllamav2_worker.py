"""The exllamav2 backend through the real worker app (aiohttp on loopback, the official openai client).

No CUDA here: the real exllamav2 package runs with the stand-ins of ``tests/support/exllamav2_standin``
(its compiled extension, the weight loading, and a scripted generator in place of the model's
forward pass). The job queue, page table, stop handling and sampler settings are exllamav2's own.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from rbee_fleet.worker.app import create_app
from rbee_fleet.worker.backends import exllamav2_load
from rbee_fleet.worker.backends.base import WorkerSpec
from rbee_fleet.worker.openai_api import RUNTIME
from rbee_fleet.worker.runtime import WorkerSettings
from tests.support import exllamav2_standin as standin
from tests.support.procs import free_port

REPLY = "The bee hive is busy. STOP bees make honey and wax."
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def tiny_model(module_tmp: Path) -> Path:
    return standin.make_tiny_model(module_tmp / "tiny-exl")


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return standin.REAL_API.Tokenizer(standin.REAL_API.Config(str(tiny_model)))


@asynccontextmanager
async def worker(tiny_model: Path, monkeypatch: pytest.MonkeyPatch, script: Any, *, paged: bool = True,
                 eos_id: int | None = 1, step_delay_s: float = 0.0, ctx_size: int = 512,
                 options: dict[str, Any] | None = None, max_queue: int = 8) -> AsyncIterator[tuple[str, Any, Any]]:
    """A worker app serving the tiny model on loopback; yields (url, runtime, stand-in generator class)."""
    api, generator = standin.standin_api(script, paged=paged, eos_id=eos_id, step_delay_s=step_delay_s)
    monkeypatch.setattr(exllamav2_load, "load_api", lambda: api)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    port = free_port()
    spec = WorkerSpec(model_id="tiny", model_path=str(tiny_model), backend="exllamav2", device="cuda:0",
                      ctx_size=ctx_size, max_queue=max_queue, options={"warmup": False, **(options or {})})
    settings = WorkerSettings(spec=spec, worker_id="exl-test", hive_id="test", host="127.0.0.1", port=port,
                              advertise_url=f"http://127.0.0.1:{port}")
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    runtime = app[RUNTIME]
    try:
        await _wait_ready(url)
        yield url, runtime, generator
    finally:
        await runner.cleanup()


async def _wait_ready(url: str, timeout: float = 30.0) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            async with session.get(f"{url}/health") as resp:
                body = await resp.json()
            if body["state"] in ("ready", "failed"):
                return body
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(body)
            await asyncio.sleep(0.05)


async def eventually(predicate: Any, timeout: float, what: str) -> None:
    """Wait (without blocking the event loop the worker runs on) until ``predicate()`` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def the_generator(runtime: Any) -> Any:
    return runtime.backend._gen


async def test_chat_streams_the_reply_with_usage(tiny_model, tokenizer, monkeypatch):
    reply = standin.reply_of(tokenizer, REPLY)
    async with worker(tiny_model, monkeypatch, lambda prompt: reply) as (url, runtime, _):
        stream = await client(url).chat.completions.create(
            model="tiny", messages=HELLO, stream=True, stream_options={"include_usage": True})
        parts, finish, usage = [], None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(parts) == REPLY
        assert finish == "stop"  # the scripted model ended with EOS
        assert usage.completion_tokens == len(reply)  # EOS itself is not counted
        # The chat template from tokenizer_config.json, with its BOS, is what the generator received.
        job = the_generator(runtime).enqueued[-1]
        sent = job.sequences[0].input_ids.torch()[0].tolist()
        expected = tokenizer.encode("<s><|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
                                    encode_special_tokens=True)[0].tolist()
        assert sent == expected and usage.prompt_tokens == len(expected)


async def test_max_tokens_gives_length(tiny_model, tokenizer, monkeypatch):
    reply = standin.reply_of(tokenizer, REPLY)
    async with worker(tiny_model, monkeypatch, lambda prompt: reply) as (url, _, _):
        resp = await client(url).completions.create(model="tiny", prompt="Hello", max_tokens=5)
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage.completion_tokens == 5
        assert resp.choices[0].text == tokenizer.decode(standin.torch.tensor([reply[:5]]))[0]


async def test_stop_strings_and_eos_tokens_reach_the_job(tiny_model, tokenizer, monkeypatch):
    reply = standin.reply_of(tokenizer, REPLY)
    async with worker(tiny_model, monkeypatch, lambda prompt: reply) as (url, runtime, _):
        resp = await client(url).chat.completions.create(model="tiny", messages=HELLO, stop=["STOP", "xyz"])
        assert resp.choices[0].message.content == "The bee hive is busy. "
        assert resp.choices[0].finish_reason == "stop"
        job = the_generator(runtime).enqueued[-1]
        assert job.stop_strings == {"STOP", "xyz"}
        # EOS from config.json, generation_config.json and tokenizer_config.json's eos_token (<|im_end|>).
        assert job.stop_tokens == {1, 3}


async def test_stop_string_the_generator_missed_is_still_cut(tiny_model, tokenizer, monkeypatch):
    """The worker's own matcher guards the stream even if exllamav2 does not stop (and then cancels the job)."""
    reply = standin.reply_of(tokenizer, REPLY)
    async with worker(tiny_model, monkeypatch, lambda prompt: reply, eos_id=None,
                      step_delay_s=0.02) as (url, runtime, generator):
        real_enqueue = generator.enqueue

        def enqueue_without_stop_strings(self, job):
            job.stop_strings_list, job.stop_strings = [], set()
            job.stop_strings_utf32_buffer = job.stop_strings_utf32_offsets = None
            return real_enqueue(self, job)

        monkeypatch.setattr(generator, "enqueue", enqueue_without_stop_strings)
        resp = await client(url).completions.create(model="tiny", prompt="Hello", stop=["honey"], max_tokens=40)
        assert resp.choices[0].text == "The bee hive is busy. STOP bees make "
        assert resp.choices[0].finish_reason == "stop"
        gen = the_generator(runtime)
        await eventually(lambda: gen.cancelled, 5, what="the job to be cancelled")
        assert gen.cancelled[-1] is gen.enqueued[-1]


async def test_sampling_maps_onto_exllamav2_settings(tiny_model, monkeypatch):
    async with worker(tiny_model, monkeypatch, lambda prompt: [], options={"min_p": 0.05}) as (url, runtime, _):
        api = client(url)
        await api.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=4,
                                     presence_penalty=0.5, frequency_penalty=0.25)
        greedy = the_generator(runtime).enqueued[-1].gen_settings
        assert greedy.top_k == 1 and greedy.top_p == 0.0 and greedy.token_repetition_penalty == 1.0
        assert greedy.token_presence_penalty == 0.5 and greedy.token_frequency_penalty == 0.25

        await api.completions.create(model="tiny", prompt="Hello", temperature=0.7, top_p=0.9, seed=42, max_tokens=4)
        job = the_generator(runtime).enqueued[-1]
        s = job.gen_settings
        assert (s.temperature, s.top_p, s.top_k, s.min_p) == (0.7, 0.9, 0, 0.05)
        assert s.token_repetition_penalty == 1.0 and s.token_presence_penalty == 0.0
        import random
        assert job.rng.random() == random.Random(42).random()  # the seed reached the job's sampler RNG
        assert job.max_new_tokens == 4


async def test_client_disconnect_cancels_the_job_and_frees_the_cache(tiny_model, tokenizer, monkeypatch):
    endless = standin.reply_of(tokenizer, " bees")
    async with worker(tiny_model, monkeypatch, lambda prompt: endless, eos_id=None,
                      step_delay_s=0.01) as (url, runtime, _):
        async with aiohttp.ClientSession() as session:
            resp = await session.post(f"{url}/v1/completions",
                                      json={"model": "tiny", "prompt": "Hello", "max_tokens": 400, "stream": True})
            got = 0
            async for _line in resp.content:
                got += 1
                if got >= 6:
                    break
            resp.close()  # the client goes away mid-stream
        gen = the_generator(runtime)
        await eventually(lambda: gen.cancelled, 5, what="the generator to cancel the job")
        assert gen.cancelled[-1] is gen.enqueued[-1]
        await eventually(lambda: gen.num_remaining_jobs() == 0, 5, what="no jobs left")
        decoded = runtime.backend.decoded_total
        await asyncio.sleep(0.2)
        assert runtime.backend.decoded_total == decoded < 400  # decoding really stopped
        stats = runtime.backend.stats()
        await eventually(lambda: runtime.backend.stats()["cache_tokens_free"] == stats["cache_tokens_total"], 5,
                          what="every cache page to be free again")


async def test_concurrent_requests_share_the_generator_on_one_thread(tiny_model, tokenizer, monkeypatch):
    reply = standin.reply_of(tokenizer, REPLY)
    async with worker(tiny_model, monkeypatch, lambda prompt: reply, step_delay_s=0.005) as (url, runtime, _):
        api = client(url)
        results = await asyncio.gather(*(
            api.completions.create(model="tiny", prompt=f"Hello {i}", max_tokens=60) for i in range(6)))
        assert all(r.choices[0].text == REPLY for r in results)
        gen = the_generator(runtime)
        assert len(gen.enqueued) == 6
        # Every call into the generator came from one thread, and not the event loop's.
        assert len(gen.thread_ids) == 1 and threading.get_ident() not in gen.thread_ids
        health = (await _wait_ready(url))
        assert health["slots_total"] == 4 and runtime.admission.slots == 4  # paged: the batch size


async def test_requests_run_together_when_paged(tiny_model, tokenizer, monkeypatch):
    reply = standin.reply_of(tokenizer, REPLY)
    seen: list[int] = []
    async with worker(tiny_model, monkeypatch, lambda prompt: reply, step_delay_s=0.005) as (url, runtime, _):
        gen = the_generator(runtime)
        real_iterate = type(gen).iterate

        def iterate(self):
            seen.append(len(self.active_jobs))
            return real_iterate(self)

        monkeypatch.setattr(type(gen), "iterate", iterate)
        api = client(url)
        await asyncio.gather(*(api.completions.create(model="tiny", prompt="Hello", max_tokens=60) for _ in range(4)))
        assert max(seen) >= 2  # continuous batching: several jobs in one step


async def test_unpaged_worker_has_one_slot(tiny_model, tokenizer, monkeypatch):
    reply = standin.reply_of(tokenizer, REPLY)
    async with worker(tiny_model, monkeypatch, lambda prompt: reply, paged=False) as (url, runtime, _):
        health = await _wait_ready(url)
        assert health["slots_total"] == 1
        assert health["cache_tokens_total"] == 512 and health["cache_tokens_free"] == 512
        assert not the_generator(runtime).paged and the_generator(runtime).max_batch_size == 1
        resp = await client(url).completions.create(model="tiny", prompt="Hello", max_tokens=60)
        assert resp.choices[0].text == REPLY


async def test_request_over_the_cache_budget_is_refused_before_streaming(tiny_model, monkeypatch):
    # Context 1024 per sequence, but only 512 tokens (2 pages) of cache in all: 512 is the real limit.
    async with worker(tiny_model, monkeypatch, lambda prompt: [], ctx_size=1024,
                      options={"cache_tokens": 512}) as (url, runtime, _):
        health = await _wait_ready(url)
        assert health["context_length"] == 512 and health["cache_tokens_total"] == 512
        with pytest.raises(openai.BadRequestError) as info:
            await client(url).completions.create(model="tiny", prompt="Hello", max_tokens=600, stream=True)
        err = info.value.body
        assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
        assert the_generator(runtime).enqueued == []  # nothing reached the generator
        ok = await client(url).chat.completions.create(model="tiny", messages=HELLO)  # no max_tokens: what fits
        assert ok.choices[0].finish_reason == "stop"
        assert the_generator(runtime).enqueued[-1].max_new_tokens == 512 - ok.usage.prompt_tokens


async def test_generator_failure_is_a_500_and_the_worker_survives(tiny_model, tokenizer, monkeypatch):
    reply = standin.reply_of(tokenizer, REPLY)
    async with worker(tiny_model, monkeypatch, lambda prompt: reply) as (url, runtime, generator):
        generator.fail_with = RuntimeError("CUDA error: an illegal memory access was encountered")
        with pytest.raises(openai.InternalServerError) as info:
            await client(url).completions.create(model="tiny", prompt="Hello", max_tokens=10)
        assert "illegal memory access" in info.value.body["message"]
        generator.fail_with = None
        resp = await client(url).completions.create(model="tiny", prompt="Hello", max_tokens=60)
        assert resp.choices[0].text == REPLY


async def test_bad_option_fails_the_worker_with_the_reason(tiny_model, monkeypatch):
    async with worker(tiny_model, monkeypatch, lambda prompt: [], options={"cache": "q3"}) as (url, _, _):
        health = await _wait_ready(url)
        assert health["state"] == "failed"
        assert "cache='q3'" in health["error"] and "fp16" in health["error"]


@pytest.mark.parametrize("field, extra", [
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("logprobs", {"logprobs": True}),
    ("n", {"n": 2}),
])
async def test_fields_the_backend_cannot_honour_are_refused_naming_them(tiny_model, monkeypatch, field, extra):
    async with worker(tiny_model, monkeypatch, lambda prompt: []) as (url, runtime, _gen):
        async with aiohttp.ClientSession() as session:
            body = {"model": "tiny", "messages": HELLO, "max_tokens": 4, **extra}
            async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                status, answer = resp.status, await resp.json()
            async with session.post(f"{url}/v1/completions",
                                    json={"model": "tiny", "prompt": "x", "suffix": "y", "max_tokens": 4}) as resp:
                suffix_status, suffix_answer = resp.status, await resp.json()
    assert status == 400 and answer["error"]["param"] == field, answer
    assert answer["error"]["code"] == "unsupported_parameter" and "exllamav2" in answer["error"]["message"]
    assert suffix_status == 400 and suffix_answer["error"]["param"] == "suffix"
    assert runtime.requests_total == 0  # nothing was generated
