"""Loading with exllamav2: the backend's calls checked against the real package's classes and signatures.

The real ``ExLlamaV2Config``, ``ExLlamaV2Tokenizer``, cache classes and generator run here; only weight
loading (``CpuModelStandIn``) and the compiled extension are stand-ins (see ``tests/support/exllamav2_standin``).
"""

from __future__ import annotations

import inspect
import json
import math
import sys
from pathlib import Path

import pytest

from rbee_fleet.common.vram import ExlOptions
from rbee_fleet.worker.backends import exllamav2_load
from rbee_fleet.worker.backends.base import BackendError, SamplingParams, WorkerSpec
from rbee_fleet.worker.backends.exllamav2 import ExLlamaV2Backend, pin_devices, sampler_settings
from rbee_fleet.worker.backends.exllamav2_load import ChatConfig, load_model
from tests.support import exllamav2_standin as standin

xl = standin.exllamav2


@pytest.fixture(scope="module")
def tiny_model(module_tmp: Path) -> Path:
    return standin.make_tiny_model(module_tmp / "tiny-exl")


def spec_for(model: Path, ctx: int = 512, **options) -> WorkerSpec:
    return WorkerSpec(model_id="tiny", model_path=str(model), backend="exllamav2", device="cuda:0",
                      ctx_size=ctx, options={"warmup": False, **options})


def load(model: Path, *, flash: bool = True, ctx: int = 512, **options) -> exllamav2_load.LoadedModel:
    """load_model with the stand-ins; ``flash``: whether paged attention (flash-attn >= 2.5.7) is usable."""
    api, _ = standin.standin_api(paged=flash)
    return load_model(spec_for(model, ctx, **options), api)


def test_autosplit_loads_into_a_lazy_cache_sized_from_the_request_budget(tiny_model):
    m = load(tiny_model, ctx=300)
    assert m.context == 512 and m.config.max_seq_len == 512  # rounded up to whole 256-token pages
    assert type(m.cache) is xl.ExLlamaV2Cache  # FP16 by default
    assert m.cache.max_seq_len == 512 * 4 and m.batch_size == 4  # paged: four full contexts
    [(name, bound)] = m.model.calls
    assert name == "load_autosplit" and bound.arguments["cache"] is m.cache
    gen = m.generator
    assert gen.paged and gen.max_batch_size == 4 and gen.page_size == 256 and gen.max_pages == 8
    assert gen.model is m.model and gen.tokenizer is m.tokenizer and gen.cache is m.cache


def test_explicit_gpu_split_loads_first_then_allocates_the_cache(tiny_model):
    m = load(tiny_model, gpu_split="10,12.5")
    [(name, bound)] = m.model.calls
    assert name == "load" and bound.arguments["gpu_split"] == [10.0, 12.5]
    assert m.cache.key_states[0] is not None  # allocated at construction, beside the loaded layers


@pytest.mark.parametrize("kind, cls", [("q4", "ExLlamaV2Cache_Q4"), ("q6", "ExLlamaV2Cache_Q6"),
                                       ("q8", "ExLlamaV2Cache_Q8"), ("fp16", "ExLlamaV2Cache")])
def test_cache_type_comes_from_the_options(tiny_model, kind, cls):
    m = load(tiny_model, cache=kind)
    assert type(m.cache) is getattr(xl, cls)


def test_without_flash_attn_the_generator_is_unpaged_with_batch_one(tiny_model):
    m = load(tiny_model, flash=False, ctx=1000)
    assert not m.paged and m.batch_size == 1
    assert not m.generator.paged and m.generator.max_batch_size == 1
    assert m.cache.max_seq_len == 1024 and m.generator.max_pages == 1  # the whole cache is one sequence


def test_paged_true_without_flash_attn_is_refused(tiny_model):
    with pytest.raises(BackendError, match="flash-attn >= 2.5.7"):
        load(tiny_model, flash=False, paged=True)


def test_cache_tokens_and_batch_options(tiny_model):
    m = load(tiny_model, ctx=1024, cache_tokens=3000, max_batch_size=2)
    assert m.cache.max_seq_len == 3072 and m.generator.max_batch_size == 2


@pytest.mark.parametrize("options, message", [
    ({"cache": "q3"}, "cache='q3'"),
    ({"gpu_split": "ten"}, "gpu_split"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"pagd": True}, "unknown exllamav2 option(s) pagd"),
    ({"paged": "maybe"}, "paged"),
])
def test_bad_options_are_named(tiny_model, options, message):
    with pytest.raises(BackendError) as info:
        load(tiny_model, **options)
    assert message in str(info.value)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(BackendError, match="not a model directory"):
        load(tmp_path)


def test_device_must_be_a_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(BackendError, match="NVIDIA GPUs only"):
        pin_devices("cpu")
    pin_devices("cuda:1,2")
    import os
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,2"
    pin_devices("cuda:0")  # the hive's pinning wins over the worker's own
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,2"


def test_missing_exllamav2_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "exllamav2", None)
    with pytest.raises(BackendError, match=r"rbee-fleet\[gpu\]"):
        exllamav2_load.import_api()


def test_real_api_classes(tiny_model):
    api = exllamav2_load.import_api()
    assert api.Generator is standin.dynamic.ExLlamaV2DynamicGenerator
    assert api.caches["q4"] is xl.ExLlamaV2Cache_Q4 and api.Config is xl.ExLlamaV2Config
    # The calls load_model makes, bound against the real signatures.
    inspect.signature(api.Config).bind(str(tiny_model))
    inspect.signature(api.Model).bind(object())
    for cache in api.caches.values():
        inspect.signature(cache).bind(object(), max_seq_len=512, lazy=True)
    inspect.signature(xl.ExLlamaV2.load_autosplit).bind(object(), object(), progress=False)
    inspect.signature(xl.ExLlamaV2.load).bind(object(), gpu_split=[1.0], progress=False)
    inspect.signature(api.Generator).bind(model=1, cache=2, tokenizer=3, max_batch_size=4, paged=True)
    inspect.signature(api.Job).bind(input_ids=1, max_new_tokens=2, stop_conditions=[], gen_settings=None,
                                    seed=None, identifier=1)
    inspect.signature(api.Tokenizer.encode).bind(object(), "x", add_bos=True, encode_special_tokens=False)


def test_sampler_settings_from_openai_parameters():
    Settings = standin.REAL_API.Settings
    greedy = sampler_settings(Settings, SamplingParams(max_tokens=5, temperature=0.0, presence_penalty=1.5), ExlOptions())
    assert greedy.top_k == 1 and greedy.token_presence_penalty == 1.5 and greedy.token_repetition_penalty == 1.0
    s = sampler_settings(Settings, SamplingParams(max_tokens=5, temperature=1.2, top_p=0.5, frequency_penalty=-0.5),
                         ExlOptions(top_k=40, min_p=0.1))
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.token_frequency_penalty) == (1.2, 0.5, 40, 0.1, -0.5)


def test_chat_config_forms(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": False}, "eos_token": "<|eot_id|>",
    }))
    chat = ChatConfig.read(tmp_path)
    assert (chat.template, chat.bos_token, chat.eos_token, chat.add_bos) == ("D", "<|begin_of_text|>", "<|eot_id|>", True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>"}))
    (tmp_path / "chat_template.jinja").write_text("J")
    chat = ChatConfig.read(tmp_path)
    assert (chat.template, chat.bos_token, chat.add_bos) == ("J", "", False)


def test_model_without_template_falls_back_to_chatml(module_tmp):
    model = standin.make_tiny_model(module_tmp / "no-template", template=None)
    backend = ExLlamaV2Backend(spec_for(model), load(model))
    try:
        text = backend.render_chat([{"role": "user", "content": "Hi"}])
        assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        assert backend.tokenize("Hi", templated=False)[0] == 0  # plain text gets BOS (add_bos_token)
        assert backend.tokenize(text, templated=True)[0] == 2  # <|im_start|> as one special token
    finally:
        backend.close()


@pytest.mark.parametrize("paged", [True, False])
def test_budget_check_agrees_with_exllamav2s_own_page_accounting(tiny_model, paged):
    """check_budget refuses exactly what the real generator's enqueue would reject with an assertion."""
    m = load(tiny_model, flash=paged, ctx=1024, cache_tokens=768)
    backend = ExLlamaV2Backend(spec_for(tiny_model), m)
    try:
        gen, Job = m.generator, m.api.Job
        total = gen.max_pages * gen.page_size
        for prompt in (1, 200, 255, 256, 257, 700):
            for max_tokens in (1, 56, 57, 300, 512, 800):
                refused = False
                try:
                    backend.check_budget(prompt, max_tokens)
                except Exception:  # noqa: BLE001
                    refused = True
                job = Job(input_ids=standin.torch.zeros((1, prompt), dtype=standin.torch.long), max_new_tokens=max_tokens)
                try:
                    job.prepare_for_queue(gen, 0)
                    rejected = False
                except AssertionError as exc:
                    rejected = "pages" in str(exc)
                assert refused == rejected, (prompt, max_tokens)
                assert refused == (math.ceil((prompt + max_tokens) / gen.page_size) * gen.page_size > total)
    finally:
        backend.close()
