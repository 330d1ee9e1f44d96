"""A GGUF worker on a real Vulkan device: Mesa's lavapipe, a Vulkan 1.3 driver that runs on the CPU.

llama-server's Vulkan backend (built by ``just setup-test``) sees lavapipe only when told to
(``GGML_VK_VISIBLE_DEVICES=0``: ggml skips CPU-type Vulkan devices by default, so a real fleet never
offloads to one by accident). The queen's embedded hive then reports ``vulkan:0`` and places workers
on it; every layer goes to the device, which llama-server's own load log shows. Generations are short:
lavapipe decodes about one token a second here.
"""

from __future__ import annotations

import json
import re

import aiohttp
import jsonschema
import openai
import pytest

from rbee_fleet.common import llama_engine
from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.jobs import JobClient
from rbee_fleet.contracts.fleet import WorkerSpawnOp, WorkerStopOp
from tests.support import procs

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_the_vulkan_backend_is_installed_and_sees_lavapipe():
    """Not a skip: the test setup builds the Vulkan backend, and CI installs Mesa's lavapipe."""
    binary = llama_engine.find_binary()
    assert "vulkan" in llama_engine.installed_backends(binary), (
        "the Vulkan backend of llama-server is not installed: `just setup-test` builds it "
        "(needs glslc, libvulkan-dev, spirv-headers and mesa-vulkan-drivers)")
    devices = llama_engine.list_devices(binary, {"GGML_VK_VISIBLE_DEVICES": "0"})
    assert [d.id for d in devices] == ["vulkan:0"] and "llvmpipe" in devices[0].description, devices


@pytest.fixture(scope="module")
def vulkan_fleet(module_tmp):
    port = procs.free_port()
    inv = procs.write_inventory(module_tmp / "fleet.toml", port=port, worker_port_base=procs.free_port_range(10),
                                workers=[{"model": "smollm2", "name": "vk", "device": "vulkan:0", "slots": 2,
                                          "ctx_size": 1024}])
    env = {"GGML_VK_VISIBLE_DEVICES": "0", "MESA_SHADER_CACHE_DIR": str(module_tmp / "mesa-shaders")}
    queen = procs.start_queen(module_tmp, inv, module_tmp / "home", port, env=env)
    try:
        procs.wait_workers_ready(queen, 1, timeout=240)
        yield queen
    finally:
        queen.stop(timeout=60)


async def _job(queen, op, events=None) -> dict:
    async with aiohttp.ClientSession() as session:
        client = JobClient(session, queen.url, headers=procs.admin_headers(queen.extra["home"]))
        return await client.run(op, on_event=events.append if events is not None else None)


def test_every_layer_is_on_the_vulkan_device(vulkan_fleet):
    [view] = procs.wait_workers_ready(vulkan_fleet, 1)
    hb = view["heartbeat"]
    assert hb["device"] == "vulkan:0" and hb["backend"] == "llamacpp"
    # The worker read llama-server's own load log: all 31 layers (30 blocks and the output) on the GPU, and
    # the memory of its buffers there.
    assert (hb["gpu_layers"], hb["model_layers"]) == (31, 31), hb
    assert hb["vram_used_mb"] and hb["vram_used_mb"] > 90, hb
    log = (vulkan_fleet.extra["home"] / "logs" / "worker-vk.log").read_text(errors="replace")
    assert "offloaded 31/31 layers to GPU" in log
    assert re.search(r"Vulkan0 model buffer size = +9\d\.\d+ MiB", log), log[-2000:]
    # The hive reports the device in llama-server's words, and /v1/models says where the model runs.
    _, status, _ = procs.http_json(f"{vulkan_fleet.url}/v1/status", headers=procs.admin_headers(vulkan_fleet.extra["home"]))
    [hive] = status["hives"]
    [device] = hive["devices"]["engine_devices"]
    assert device["id"] == "vulkan:0" and device["name"] == "Vulkan0" and device["memory_total_mb"] > 0
    assert hive["devices"]["engine_backends"]["vulkan"] == "ok"
    _, models, _ = procs.http_json(f"{vulkan_fleet.url}/v1/models")
    assert {m["id"]: m["devices"] for m in models["data"]}["smollm2"] == ["localhost/vulkan:0"]


async def test_streamed_chat_tools_and_a_strict_schema_on_vulkan(vulkan_fleet):
    client = openai.AsyncOpenAI(base_url=f"{vulkan_fleet.url}/v1", api_key="unused-on-loopback", max_retries=0,
                                timeout=300)
    stream = await client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, temperature=0,
        stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    async for chunk in stream:
        usage = chunk.usage or usage
        pieces += [c.delta.content for c in chunk.choices if c.delta.content]
    assert len(pieces) >= 2 and "".join(pieces).strip() and usage.completion_tokens == 6

    calls = await client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the weather in Paris? Use the tool."}],
        tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=40)
    choice = calls.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert isinstance(json.loads(choice.message.tool_calls[0].function.arguments), dict)

    person = await client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Invent a person."}], temperature=0, max_tokens=30,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}})
    jsonschema.validate(json.loads(person.choices[0].message.content), PERSON)


async def test_auto_picks_the_vulkan_device_and_a_missing_one_is_refused_by_name(vulkan_fleet):
    events = []
    result = await _job(vulkan_fleet, WorkerSpawnOp(model="smollm2", worker_id="vk-auto", device="auto",
                                                    ctx_size=512, slots=1), events)
    try:
        assert result["worker"]["device"] == "vulkan:0"
        said = " | ".join(e.message for e in events)
        assert re.search(r"placed vk-auto on vulkan:0 \(llvmpipe .*\): smollm2 needs about \d+ MiB", said), said
    finally:
        await _job(vulkan_fleet, WorkerStopOp(worker_id="vk-auto"))

    with pytest.raises(OperationFailed) as refused:
        await _job(vulkan_fleet, WorkerSpawnOp(model="smollm2", worker_id="vk-seven", device="vulkan:7"))
    message = str(refused.value)
    assert "device vulkan:7 does not exist on hive localhost" in message and "vulkan:0 (llvmpipe" in message, message
    with pytest.raises(OperationFailed) as no_cuda:
        await _job(vulkan_fleet, WorkerSpawnOp(model="smollm2", worker_id="vk-cuda", device="cuda:0"))
    assert "device cuda:0 does not exist on hive localhost (the cuda backend of llama-server is" in str(no_cuda.value)
