"""Model downloads from the Hugging Face hub, end to end: a real queen (embedded hive) whose
``huggingface_hub`` is pointed with ``HF_ENDPOINT`` at a stand-in for the hub (``tests/support/hf_standin``).

A GGUF single file (then served by a real llama.cpp worker), EXL2 branches per bits-per-weight,
progress, idempotence, and the hub's not-found errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import numpy as np
import openai
import pytest
from safetensors.numpy import save as save_safetensors

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.jobs import JobClient
from rbee_fleet.contracts.fleet import ModelDownloadOp, WorkerSpawnOp, WorkerStopOp
from tests.support import procs
from tests.support.hf_standin import HubStandIn, ServedHub

GGUF_REPO = "bartowski/SmolLM2-135M-Instruct-GGUF"
GGUF_FILE = "SmolLM2-135M-Instruct-Q4_1.gguf"
EXL2_REPO = "turboderp/TinyBee-exl2"


def exl2_branch(bits: float, layers: int = 2) -> dict[str, bytes]:
    """One branch of an EXL2 repository: config, tokenizer files and quantized tensors (q_weight, q_scale...)."""
    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": np.zeros((320, 64), np.float16)}
    width = int(64 * bits / 32)
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            p = f"model.layers.{i}.self_attn.{proj}"
            tensors |= {f"{p}.q_weight": np.zeros((width, 64), np.int32), f"{p}.q_scale": np.zeros((2, 8), np.int32),
                        f"{p}.q_scale_max": np.zeros(2, np.float16), f"{p}.q_groups": np.zeros(4, np.int16)}
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": layers, "vocab_size": 320, "max_position_embeddings": 4096}
    return {
        "config.json": json.dumps(config).encode(),  # like many EXL2 branches: no quantization_config
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b'{"eos_token": "<|im_end|>"}',
        "output.safetensors": save_safetensors(tensors, metadata={"bits": str(bits)}),
    }


@pytest.fixture(scope="module")
def hub(model_path):
    gguf = Path(model_path).read_bytes()
    repos = {
        GGUF_REPO: {"main": {GGUF_FILE: gguf, "SmolLM2-135M-Instruct-Q8_0.gguf": b"not this one" * 200,
                             "README.md": b"# SmolLM2 GGUF\n"}},
        EXL2_REPO: {"main": {"README.md": b"# TinyBee EXL2\n", "measurement.json": b"{}"},
                    "4.0bpw": exl2_branch(4.0), "6.0bpw": exl2_branch(6.0)},
    }
    with ServedHub(HubStandIn(repos, chunk_delay_s=0.08)) as served:
        yield served


@pytest.fixture(scope="module")
def queen(module_tmp, hub):
    port = procs.free_port()
    inventory = procs.write_inventory(module_tmp / "inventory.toml", port=port,
                                      worker_port_base=procs.free_port_range(4), workers=[])
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(module_tmp / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = procs.start_queen(module_tmp, inventory, module_tmp / "home", port, env=env)
    yield proc
    proc.stop()


async def run(queen, op) -> tuple[dict, list]:
    events: list = []
    async with aiohttp.ClientSession() as session:
        result = await JobClient(session, queen.url, procs.admin_headers(queen.extra["home"])).run(op, on_event=events.append)
    return result, events


def models_dir(queen) -> Path:
    return queen.extra["home"] / "models"


async def test_gguf_single_file_is_downloaded_and_served(queen, hub, model_path):
    source = f"hf:{GGUF_REPO}/{GGUF_FILE}"
    result, events = await run(queen, ModelDownloadOp(source=source))
    entry = result["model"]
    assert result["changed"] and entry["id"] == "SmolLM2-135M-Instruct-Q4_1" and entry["format"] == "gguf"
    assert Path(entry["path"]).read_bytes() == Path(model_path).read_bytes()
    assert sorted(p.name for p in Path(entry["path"]).parent.iterdir()) == [GGUF_FILE, "rbee-model.json"]
    assert not any("Q8_0" in r for r in hub.requests)  # only the file asked for
    sized = [e.progress for e in events if e.progress and e.progress.total]
    assert sized and sized[-1].total == Path(model_path).stat().st_size and sized[-1].current >= sized[-1].total

    # The downloaded model runs: a real llama.cpp worker, an answer through the queen.
    result, _ = await run(queen, WorkerSpawnOp(model=entry["id"], ctx_size=512, threads=2))
    assert result["worker"]["state"] == "running"
    client = openai.AsyncOpenAI(base_url=f"{queen.url}/v1", api_key="unused", max_retries=0)
    procs.wait_workers_ready(queen, 1)
    answer = await client.chat.completions.create(
        model=entry["id"], messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
    assert answer.choices[0].message.content.strip()
    await run(queen, WorkerStopOp(worker_id=result["worker"]["worker_id"]))


async def test_exl2_branches_download_side_by_side_with_progress(queen, hub):
    hub.requests.clear()
    six, events = await run(queen, ModelDownloadOp(source=f"hf:{EXL2_REPO}@6.0bpw"))
    four, _ = await run(queen, ModelDownloadOp(source=f"hf:{EXL2_REPO}@4.0bpw"))
    assert six["model"]["id"] == "TinyBee-exl2-6.0bpw" and four["model"]["id"] == "TinyBee-exl2-4.0bpw"
    for result, bits in ((six, 6.0), (four, 4.0)):
        entry = result["model"]
        assert entry["format"] == "exl2"  # found from the q_weight tensors: config.json does not say
        files = {p.name: p.read_bytes() for p in Path(entry["path"]).iterdir()}
        branch = exl2_branch(bits)
        assert set(files) == set(branch) | {"rbee-model.json"}  # the branch only: no README, no .cache
        assert all(files[name] == data for name, data in branch.items())
        assert entry["size_bytes"] == sum(len(d) for d in branch.values())
    assert any("/revision/6.0bpw" in r for r in hub.requests) and any("/revision/4.0bpw" in r for r in hub.requests)
    assert not any("README.md" in r or "measurement.json" in r for r in hub.requests if "/resolve/" in r)
    progress = [e.progress for e in events if e.progress and e.progress.unit == "bytes" and e.progress.total]
    assert len(progress) >= 2 and progress[-1].current >= progress[-1].total == six["model"]["size_bytes"]
    assert [p.current for p in progress] == sorted(p.current for p in progress)

    again, _ = await run(queen, ModelDownloadOp(source=f"hf:{EXL2_REPO}@6.0bpw"))
    assert again["changed"] is False  # already in the catalog


async def test_exl2_model_cannot_run_without_a_gpu(queen):
    await run(queen, ModelDownloadOp(source=f"hf:{EXL2_REPO}@4.0bpw"))
    with pytest.raises(OperationFailed, match="no NVIDIA GPU"):
        await run(queen, WorkerSpawnOp(model="TinyBee-exl2-4.0bpw", device="auto"))
    with pytest.raises(OperationFailed, match="exllamav2 needs an NVIDIA GPU"):
        await run(queen, WorkerSpawnOp(model="TinyBee-exl2-4.0bpw", device="cpu"))


@pytest.mark.parametrize("source, words", [
    (f"hf:{EXL2_REPO}@7.0bpw", "7.0bpw"),
    ("hf:nobody/NoSuchModel-exl2@6.0bpw", "nobody/NoSuchModel-exl2"),
    (f"hf:{GGUF_REPO}/SmolLM2-135M-Instruct-Q2_K.gguf", "no file"),
])
async def test_not_found_is_a_clear_failure_that_leaves_nothing(queen, source, words):
    before = sorted(p.name for p in models_dir(queen).iterdir())
    with pytest.raises(OperationFailed) as info:
        await run(queen, ModelDownloadOp(source=source, name="broken"))
    assert words in str(info.value) and "not found" in str(info.value).lower()
    assert sorted(p.name for p in models_dir(queen).iterdir()) == before  # no half model, no staging dir


async def test_cancelled_download_leaves_nothing_behind(queen, hub):
    before = sorted(p.name for p in models_dir(queen).iterdir())
    hub.completed.clear()
    async with aiohttp.ClientSession() as session:
        jobs = JobClient(session, queen.url, procs.admin_headers(queen.extra["home"]))
        job_id = await jobs.submit(ModelDownloadOp(source=f"hf:{GGUF_REPO}/{GGUF_FILE}", name="cancelled"))
        async for event in jobs.events(job_id):
            if event.progress and event.progress.current:
                break  # bytes are arriving
        await jobs.cancel(job_id)
    procs.wait_until(lambda: sorted(p.name for p in models_dir(queen).iterdir()) == before, 10,
                     what="the staging directory to be gone")
    import time
    time.sleep(2.5)  # longer than the rest of the download would have taken
    assert sorted(p.name for p in models_dir(queen).iterdir()) == before
    assert hub.completed == []  # the download itself stopped, not only the job
