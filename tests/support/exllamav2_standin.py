"""Stand-ins that let the real exllamav2 package run its CPU-side code where there is no CUDA.

Everything here is a stand-in, named as one, for the parts of exllamav2 that need an NVIDIA GPU:

- ``exllamav2_ext`` (its compiled CUDA extension): only the two host-side helpers the generator's
  bookkeeping calls (``partial_strings_match`` for stop strings, ``count_match`` for prefix reuse),
  rewritten in Python with the extension's semantics. Installed only when CUDA is absent.
- ``CpuModelStandIn``: the real ``ExLlamaV2`` model class, except that ``load``/``load_autosplit`` check
  their arguments against the real signatures and place the cache on the CPU instead of loading
  weights, and a forward pass computes nothing.
- ``ScriptedGeneratorStandIn``: the real ``ExLlamaV2DynamicGenerator`` (job queue, page table, stop
  conditions, held text, results) whose ``iterate()`` takes each next token from a script instead of
  sampling the logits of a CUDA forward pass.

The real config, tokenizer, cache classes, jobs and sampler settings are used as they are.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from rbee_fleet.worker.backends.exllamav2_load import ExLlamaV2Api, import_api


def _partial_strings_match(match: Any, offsets: Any, strings: Any) -> int:
    """Index of the first stop string found in the text, -2 if the text ends in a prefix of one, else -1."""
    text = np.frombuffer(bytes(match), dtype=np.uint32)
    ends = np.frombuffer(bytes(offsets), dtype=np.uint32) // 4
    pool = np.frombuffer(bytes(strings), dtype=np.uint32)
    for i in range(len(ends) - 1):
        stop = pool[ends[i]:ends[i + 1]]
        for start in range(len(text)):
            tail = text[start:start + len(stop)]
            if len(tail) == len(stop) and np.array_equal(tail, stop):
                return start
            if len(tail) < len(stop) and np.array_equal(tail, stop[: len(tail)]):
                return -2
    return -1


def _count_match(a: torch.Tensor, b: torch.Tensor, max_a: int) -> int:
    """How many leading tokens of ``a`` and ``b`` agree (at most ``max_a``)."""
    n = min(max_a, b.shape[-1], a.shape[-1])
    same = (a.reshape(-1)[:n] == b.reshape(-1)[:n]).tolist()
    return same.index(False) if False in same else n


def install_ext_standin() -> bool:
    """Put the extension stand-in in place before exllamav2 is imported; False where CUDA makes it needless."""
    if "exllamav2_ext" in sys.modules or torch.cuda.is_available():
        return False
    ext = types.ModuleType("exllamav2_ext")
    ext.__doc__ = "stand-in for exllamav2's compiled CUDA extension (tests only)"
    ext.partial_strings_match = _partial_strings_match  # type: ignore[attr-defined]
    ext.count_match = _count_match  # type: ignore[attr-defined]
    sys.modules["exllamav2_ext"] = ext
    return True


install_ext_standin()
exllamav2 = importlib.import_module("exllamav2")
dynamic = importlib.import_module("exllamav2.generator.dynamic")
REAL_API = import_api()


# -- a tiny model directory, real in every file but the weights (zeros) ------------------------------


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = ["Hello world. The bee hive is busy; bees make honey and wax. user assistant system STOP END"] * 8


def make_tiny_model(path: Path, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    template: str | None = TEMPLATE) -> Path:
    """A Llama-shaped safetensors model exllamav2's config and tokenizer load for real (weights are zeros)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path.mkdir(parents=True, exist_ok=True)
    special = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path / "tokenizer.json"))
    vocab, inter, head_dim = tok.get_vocab_size(), hidden * 2, hidden // heads
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": inter,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": layers,
        "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float16",
    }))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    tcfg: dict[str, Any] = {"bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": True}
    if template is not None:
        tcfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    tensors = {"model.embed_tokens.weight": torch.zeros(vocab, hidden), "model.norm.weight": torch.ones(hidden),
               "lm_head.weight": torch.zeros(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": torch.zeros(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": torch.zeros(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": torch.zeros(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": torch.zeros(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": torch.zeros(inter, hidden),
            p + "mlp.up_proj.weight": torch.zeros(inter, hidden),
            p + "mlp.down_proj.weight": torch.zeros(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        }
    save_file({k: v.half() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


# -- the model: real class, no CUDA ------------------------------------------------------------------


class CpuModelStandIn(exllamav2.ExLlamaV2):
    """Stand-in for a loaded ``ExLlamaV2``: load calls are checked and recorded, the cache lives on the CPU."""

    calls: list[tuple[str, inspect.BoundArguments]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        inspect.signature(exllamav2.ExLlamaV2.__init__).bind(self, *args, **kwargs)
        super().__init__(*args, **kwargs)
        self.calls = []

    def load(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("load", inspect.signature(exllamav2.ExLlamaV2.load).bind(self, *args, **kwargs)))
        self.loaded = True

    def load_autosplit(self, *args: Any, **kwargs: Any) -> None:
        bound = inspect.signature(exllamav2.ExLlamaV2.load_autosplit).bind(self, *args, **kwargs)
        self.calls.append(("load_autosplit", bound))
        _materialise_on_cpu(bound.arguments["cache"])
        self.loaded = True

    def forward_chunk(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"logits": None}

    def unload(self) -> None:
        self.calls.append(("unload", inspect.signature(exllamav2.ExLlamaV2.unload).bind(self)))


def _materialise_on_cpu(cache: Any) -> None:
    """What ``load_autosplit`` does to a lazy cache, on the CPU: allocate its tensors."""
    cache.key_states, cache.value_states, cache.key_scales, cache.value_scales = [], [], [], []
    cache.fixed_device = "cpu"
    cache.create_state_tensors(None, lazy=False)


# -- the generator: real queue and page table, scripted tokens ---------------------------------------


Script = Callable[[list[int]], list[int]]  # prompt ids -> the reply's token ids (EOS appended by the stand-in)


class ScriptedGeneratorStandIn(dynamic.ExLlamaV2DynamicGenerator):
    """Stand-in for ``ExLlamaV2DynamicGenerator`` where each next token comes from ``script``.

    Only ``iterate()`` (which would run the model and sample) and ``defrag_cache()`` (CUDA kernels) are
    replaced; enqueue, cancel, the page table and every job's stop handling are exllamav2's own.
    """

    script: Script = staticmethod(lambda prompt: [])  # type: ignore[assignment]
    eos_id: int | None = 1
    step_delay_s: float = 0.0
    fail_with: BaseException | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        inspect.signature(dynamic.ExLlamaV2DynamicGenerator.__init__).bind(self, *args, **kwargs)
        with mock.patch.object(dynamic, "assert_paged_attn", lambda: None):  # flash-attn is a CUDA library
            super().__init__(*args, **kwargs)
        self.thread_ids: set[int] = set()
        self.cancelled: list[Any] = []
        self.enqueued: list[Any] = []
        self.steps = 0
        self._plans: dict[int, list[int]] = {}

    def enqueue(self, job: Any) -> Any:
        self.thread_ids.add(threading.get_ident())
        serial = super().enqueue(job)
        self.enqueued.append(job)
        return serial

    def cancel(self, job: Any) -> None:
        self.thread_ids.add(threading.get_ident())
        self.cancelled.append(job)
        super().cancel(job)

    def defrag_cache(self) -> None:
        pass

    def iterate(self) -> list[dict[str, Any]]:
        self.thread_ids.add(threading.get_ident())
        self.steps += 1
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self.fail_with is not None:
            raise self.fail_with
        results: list[dict[str, Any]] = []
        self.iterate_start_jobs(results)
        for job in self.active_jobs:
            job.prefill(results)
        finished = []
        for job in list(self.active_jobs):
            if not job.is_prefill_done():
                continue
            if job.time_first_token is None:
                job.time_first_token = time.time()
            job.get_input_ids_list(add_to_cache=True)
            eos, _ = job.receive_sample(None, torch.tensor([[self._next(job)]]), None, None, None, False, results)
            if eos:
                finished.append(job)
        for job in finished:
            job.deallocate_pages()
            self.active_jobs.remove(job)
        return results

    def _next(self, job: Any) -> int:
        plan = self._plans.get(id(job))
        if plan is None:
            prompt = job.sequences[0].input_ids.torch()[0].tolist()
            plan = self._plans[id(job)] = list(type(self).script(prompt))
        if job.new_tokens < len(plan):
            return plan[job.new_tokens]
        if self.eos_id is None:  # keep talking: the job ends on max_new_tokens or a stop string
            return plan[-1] if plan else 0
        return self.eos_id


def standin_api(script: Script | None = None, *, paged: bool = True, eos_id: int | None = 1,
                step_delay_s: float = 0.0) -> tuple[ExLlamaV2Api, type[ScriptedGeneratorStandIn]]:
    """The real exllamav2 API with the model and generator replaced by the stand-ins above."""
    generator = type("ScriptedGeneratorStandIn", (ScriptedGeneratorStandIn,), {
        "script": staticmethod(script or (lambda prompt: [])), "eos_id": eos_id, "step_delay_s": step_delay_s,
    })
    api = ExLlamaV2Api(
        Config=REAL_API.Config, Model=CpuModelStandIn, Tokenizer=REAL_API.Tokenizer, Generator=generator,
        Job=REAL_API.Job, Settings=REAL_API.Settings, caches=REAL_API.caches, paged_attention=paged,
    )
    return api, generator


def reply_of(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_bos=False)[0].tolist()
