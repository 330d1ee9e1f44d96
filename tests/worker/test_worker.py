"""A real CPU worker process: llama.cpp's llama-server on SmolLM2, supervised by llm-worker-rbee.

The worker is used on its own here (no queen): its port is llama-server's, so any OpenAI client can
talk to it directly. What the worker adds (heartbeats from llama-server's own state, draining, dying
with its engine) is checked through a small heartbeat sink on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import openai
import pytest
from aiohttp import web

from tests.support import procs

CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture
def client(standalone_worker):
    return openai.AsyncOpenAI(base_url=f"{standalone_worker.url}/v1", api_key="unused", max_retries=0)


class HeartbeatSink:
    """A stand-in for the queen's heartbeat endpoint: a real aiohttp server that records what arrives."""

    def __init__(self) -> None:
        self.beats: list[dict] = []
        self.port = procs.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> HeartbeatSink:
        app = web.Application()

        async def beat(request: web.Request) -> web.Response:
            self.beats.append(await request.json())
            return web.json_response({"ok": True, "heartbeat_interval_s": 0.3})

        app.router.add_post("/v1/worker-heartbeat", beat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def wait_for(self, predicate, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for beat in reversed(self.beats):
                if predicate(beat):
                    return beat
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no matching heartbeat in {len(self.beats)}: {self.beats[-1:]}")


async def test_serves_the_openai_api_directly(client):
    full = await client.chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=40)
    assert "Paris" in full.choices[0].message.content
    assert full.choices[0].finish_reason == "stop"
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    models = await client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]


async def test_prompt_longer_than_the_slot_context_is_refused(client):
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="smollm2", prompt="bee " * 700, max_tokens=4)  # context is 512


async def test_heartbeats_report_llama_servers_slots_and_capabilities(tmp_path):
    async with HeartbeatSink() as sink:
        worker = await asyncio.to_thread(procs.start_worker, tmp_path, queen_url=sink.url, slots=3, ctx_size=1024,
                                         heartbeat_interval=0.3)
        try:
            ready = await sink.wait_for(lambda b: b["state"] == "ready")
            assert ready["backend"] == "llamacpp" and ready["url"] == worker.url
            assert ready["slots_total"] == 3 and ready["context_length"] == 1024
            assert {"chat", "completion", "tools", "json", "logprobs"} <= set(ready["capabilities"])
            assert "embeddings" not in ready["capabilities"]
            client = openai.AsyncOpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0)
            stream = await client.completions.create(model="smollm2", stream=True, max_tokens=300, **procs.LONG)
            async for _ in stream:
                break  # generating now
            busy = await sink.wait_for(lambda b: b["slots_busy"] == 1)
            assert busy["state"] == "ready"
            await stream.close()
            done = await sink.wait_for(lambda b: b["slots_busy"] == 0 and b["tokens_generated_total"] > 0)
            assert done["tokens_generated_total"] < 300  # the closed stream stopped generating
        finally:
            await asyncio.to_thread(worker.stop)
        assert worker.popen.returncode == 0, worker.log_text()[-2000:]
        assert sink.beats[-1]["state"] == "stopped"  # it said goodbye


async def test_sigterm_drains_a_running_request_before_stopping(tmp_path):
    async with HeartbeatSink() as sink:
        worker = await asyncio.to_thread(procs.start_worker, tmp_path, queen_url=sink.url, heartbeat_interval=0.3)
        client = openai.AsyncOpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0)
        stream = await client.completions.create(model="smollm2", stream=True, max_tokens=16, **procs.LONG)
        first = await stream.__anext__()
        worker.popen.send_signal(signal.SIGTERM)
        await sink.wait_for(lambda b: b["state"] == "draining")
        finish = first.choices[0].finish_reason
        async for chunk in stream:
            finish = chunk.choices[0].finish_reason if chunk.choices else finish
        assert finish == "length"  # all 16 tokens came, though the worker was told to stop
        code = await asyncio.to_thread(worker.popen.wait, 30)
        assert code == 0, worker.log_text()[-2000:]


def test_worker_exits_when_llama_server_dies_and_llama_server_dies_with_the_worker(tmp_path):
    worker = procs.start_worker(tmp_path)
    try:
        engine = _engine_pid(worker.pid)
        os.kill(engine, signal.SIGKILL)
        code = worker.popen.wait(30)
        assert code != 0  # the hive restarts it
        assert "llama-server was killed by signal 9" in worker.log_text()
    finally:
        worker.stop()
    worker = procs.start_worker(tmp_path)
    engine = _engine_pid(worker.pid)
    worker.popen.kill()  # SIGKILL: no chance to clean up
    worker.popen.wait(10)
    procs.wait_until(lambda: not _alive(engine), 10, what="llama-server to die with its worker")


def test_a_worker_with_a_token_refuses_callers_without_it(tmp_path):
    from rbee_fleet.common.secrets import write_secret

    token_file = tmp_path / "cluster.token"
    write_secret(token_file, "s3cret-token-value")
    worker = procs.start_worker(tmp_path, token_file=str(token_file))
    try:
        body = {"model": "smollm2", "prompt": "Hi", "max_tokens": 2}
        status, _, _ = procs.http_json(worker.url + "/v1/completions", method="POST", body=body)
        assert status == 401
        status, _, _ = procs.http_json(worker.url + "/v1/completions", method="POST", body=body,
                                       headers={"Authorization": "Bearer wrong"})
        assert status == 401
        status, answer, _ = procs.http_json(worker.url + "/v1/completions", method="POST", body=body,
                                            headers={"Authorization": "Bearer s3cret-token-value"})
        assert status == 200 and answer["usage"]["completion_tokens"] == 2
        assert "s3cret-token-value" not in worker.log_text()
        assert "s3cret-token-value" not in " ".join(_cmdline(_engine_pid(worker.pid)))  # not on a command line
        assert " ".join(_cmdline(worker.pid)).startswith("llm-worker-rbee smollm2 ")  # what ps and pkill see
    finally:
        worker.stop()
    assert worker.popen.returncode == 0, worker.log_text()[-2000:]


def test_a_worker_beyond_loopback_without_a_token_refuses_to_start(tmp_path):
    done = subprocess.run([sys.executable, "-m", "rbee_fleet.worker", "--model-path", procs.model_path(),
                           "--model-id", "smollm2", "--host", "0.0.0.0", "--port", str(procs.free_port())],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "without a cluster token" in done.stderr
    done = subprocess.run([sys.executable, "-m", "rbee_fleet.hive", "--host", "0.0.0.0", "--port", str(procs.free_port()),
                           "--home", str(tmp_path / "h")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "without a cluster token" in done.stderr


def test_a_missing_model_file_fails_with_llama_servers_reason(tmp_path):
    done = subprocess.run([sys.executable, "-m", "rbee_fleet.worker", "--model-path", str(tmp_path / "nope.gguf"),
                           "--model-id", "nope", "--port", str(procs.free_port())],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "nope.gguf" in done.stdout + done.stderr


def test_options_become_llama_server_flags_and_reserved_ones_are_refused():
    from rbee_fleet.worker.backends.base import BackendError
    from rbee_fleet.worker.llama_server import option_flags

    assert option_flags({"cache_type_k": "q8_0", "flash_attn": "on", "mlock": True}) == [
        "--cache-type-k", "q8_0", "--flash-attn", "on", "--mlock"]
    for bad in ({"port": 1}, {"api_key": "x"}, {"ctx_size": 9}, {"--evil": 1}, {"a b": 1}):
        with pytest.raises(BackendError):
            option_flags(bad)


def _engine_pid(worker_pid: int) -> int:
    def child() -> int | None:
        out = subprocess.run(["pgrep", "-P", str(worker_pid)], capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else None

    return procs.wait_until(child, 10, what="the worker's llama-server process")


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return [part.decode() for part in fh.read().split(b"\0") if part]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def test_metrics_text_is_parsed():
    from rbee_fleet.worker.llama_server import EngineStats, parse_metrics

    text = "\n".join([
        "# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.",
        "llamacpp:tokens_predicted_total 120", "llamacpp:requests_deferred 2", "llamacpp:prompt_tokens_total 30",
        "other_metric 5",
    ])
    metrics = parse_metrics(text)
    assert metrics == {"tokens_predicted_total": 120.0, "requests_deferred": 2.0, "prompt_tokens_total": 30.0}
    stats = EngineStats.read([{"id": 0, "n_ctx": 512, "is_processing": True}, {"id": 1, "n_ctx": 512}], metrics)
    assert (stats.slots_total, stats.slots_busy, stats.context_per_slot, stats.queue_depth) == (2, 1, 512, 2)
    assert json.dumps(stats.__dict__)  # plain values only
