"""``suffix`` (fill-in-the-middle) on /v1/completions, for models that have fill-in-the-middle tokens.

SmolLM2 has none, so the fleet test uses a copy of it made with ``gguf-new-metadata`` (the gguf package's
own tool) that declares three of its unused control tokens (``<jupyter_start>``, ``<jupyter_text>``,
``<jupyter_code>``) as its prefix, suffix and middle markers: a stand-in for a code model (SmolLM2 was not
trained to fill in the middle, so its answers are not judged, only what the engine was given). Real queen,
real llama-server worker, the official ``openai`` client.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest

from rbee_fleet.worker.llama_server import model_facts
from tests.support import procs

MARKERS = ("<jupyter_start>", "<jupyter_text>", "<jupyter_code>")  # token ids 11, 12, 13
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def fim_model(module_tmp: Path) -> Path:
    out = module_tmp / "smollm2-fim.gguf"
    tool = Path(sys.executable).with_name("gguf-new-metadata")
    subprocess.run([str(tool), procs.model_path(), str(out), "--special-token-by-id", "fim_pre", "11",
                    "--special-token-by-id", "fim_suf", "12", "--special-token-by-id", "fim_mid", "13"],
                   check=True, capture_output=True, timeout=120)
    return out


def test_markers_are_read_from_the_gguf_metadata(fim_model):
    assert model_facts(str(fim_model)).fim_tokens == MARKERS
    plain = model_facts(procs.model_path())
    assert plain.fim_tokens is None and "<|im_start|>" in (plain.chat_template or "")


@pytest.fixture(scope="module")
def fleet(module_tmp, fim_model):
    port = procs.free_port()
    inv = procs.write_inventory(module_tmp / "inv.toml", port=port, worker_port_base=procs.free_port_range(5),
                                workers=[], queen_extra="on_demand = false")
    home = module_tmp / "home"
    queen = procs.start_queen(module_tmp, inv, home, port)
    token = str(home / "secrets" / "cluster.token")
    workers = []
    try:
        workers.append(procs.start_worker(module_tmp, queen_url=queen.url, worker_id="coder", model_id="coder",
                                          token_file=token, model_file=str(fim_model), slots=2))
        workers.append(procs.start_worker(module_tmp, queen_url=queen.url, worker_id="chat", model_id="smollm2",
                                          token_file=token, slots=2))
        procs.wait_workers_ready(queen, 2)
        yield queen
    finally:
        for w in workers:
            w.stop()
        queen.stop()


async def test_suffix_becomes_a_fill_in_the_middle_prompt_in_the_models_markers(fleet):
    client = openai.AsyncOpenAI(base_url=f"{fleet.url}/v1", api_key="x", max_retries=0)
    cards = {m.id: m for m in (await client.models.list()).data}
    assert "infill" in cards["coder"].model_extra["capabilities"]
    assert "infill" not in cards["smollm2"].model_extra["capabilities"]

    greedy = {"model": "coder", "max_tokens": 8, "temperature": 0}
    filled = await client.completions.create(prompt=PREFIX, suffix=SUFFIX, **greedy)
    by_hand = await client.completions.create(prompt=f"{MARKERS[0]}{PREFIX}{MARKERS[1]}{SUFFIX}{MARKERS[2]}", **greedy)
    # The engine was given exactly the fill-in-the-middle prompt: same tokens, same greedy answer.
    assert filled.usage.prompt_tokens == by_hand.usage.prompt_tokens
    assert filled.choices[0].text == by_hand.choices[0].text
    # Each marker is one control token, not its spelling read as text (about 5 tokens each).
    alone = [(await client.completions.create(prompt=p, **greedy)).usage.prompt_tokens for p in (PREFIX, SUFFIX)]
    assert filled.usage.prompt_tokens <= sum(alone) + 3

    stream = await client.completions.create(prompt=PREFIX, suffix=SUFFIX, stream=True,
                                             stream_options={"include_usage": True}, **greedy)
    text, usage = "", None
    async for chunk in stream:
        text += "".join(c.text for c in chunk.choices)
        usage = chunk.usage or usage
    assert text == filled.choices[0].text and usage.prompt_tokens == filled.usage.prompt_tokens


async def test_a_model_without_markers_refuses_suffix_by_name(fleet):
    client = openai.AsyncOpenAI(base_url=f"{fleet.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model="smollm2", prompt=PREFIX, suffix=SUFFIX, max_tokens=4)
    assert info.value.body["param"] == "suffix" and "fill-in-the-middle" in info.value.body["message"]
