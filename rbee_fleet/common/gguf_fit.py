"""How much device memory a llama-server worker of a GGUF model takes, from the file's own metadata.

Shared by the hive (which GPU a ``device = "auto"`` worker goes to, or none) and the worker (how many
parallel sequences it runs), so the two size a worker the same way. The weights are the file's tensors;
the KV cache is two f16 vectors (K and V) per layer, per KV head and per token of every slot's context;
the compute buffer grows with the vocabulary (the logits of one batch). llama.cpp fits the exact layer
count itself (``--fit``); this estimate only chooses the device and says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_SLOTS_MAX = 4  # llama-server's own default number of parallel sequences
SLOTS_TOKEN_BUDGET = 16384
UBATCH = 512  # llama-server's default micro-batch: rows of logits held at once
COMPUTE_BASE_MB = 64  # activations and scratch beyond the logits
KV_BYTES = 2  # f16 cache entries (llama-server's default cache type)


def default_slots(ctx_size: int) -> int:
    """Parallel sequences when none are set: llama-server's own default of 4, fewer for long contexts so that
    the KV cache holds at most ``SLOTS_TOKEN_BUDGET`` tokens (4 x 2048 by default: what llama-server gives a
    model trained on 8192 tokens). Batching pays on any core count: decoding is bound by memory bandwidth."""
    return max(1, min(DEFAULT_SLOTS_MAX, SLOTS_TOKEN_BUDGET // max(1, ctx_size)))


@dataclass(frozen=True)
class GgufShape:
    layers: int
    weights_mb: float
    kv_bytes_per_token: int  # every layer's K and V for one token
    vocab: int

    def kv_mb(self, tokens: int) -> float:
        return self.kv_bytes_per_token * tokens / 2**20

    def compute_mb(self) -> float:
        return COMPUTE_BASE_MB + self.vocab * UBATCH * 4 / 2**20

    def need_mb(self, tokens: int) -> int:
        """Everything on one device: weights, the KV cache of ``tokens`` (all slots), the compute buffer."""
        return math.ceil(self.weights_mb + self.kv_mb(tokens) + self.compute_mb())

    def layers_fitting(self, tokens: int, free_mb: int) -> int:
        """How many of the layers (with their share of weights and cache) fit in ``free_mb``."""
        per_layer = (self.weights_mb + self.kv_mb(tokens)) / max(1, self.layers)
        room = free_mb - self.compute_mb()
        return max(0, min(self.layers, int(room // per_layer))) if per_layer > 0 else self.layers


def read_shape(path: str) -> GgufShape | None:
    """The shape of a GGUF file (``gguf`` package, no model load); None when it cannot be read."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError):
        return None
    fields = reader.fields

    def value(name: str) -> int | None:
        field = fields.get(name)
        if field is None or not field.data:
            return None
        try:
            return int(field.parts[field.data[0]][0])
        except (TypeError, ValueError, IndexError):
            return None

    arch_field = fields.get("general.architecture")
    if arch_field is None or not arch_field.data:
        return None
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8", errors="replace")
    layers = value(f"{arch}.block_count")
    embedding = value(f"{arch}.embedding_length")
    heads = value(f"{arch}.attention.head_count")
    if not layers or not embedding or not heads:
        return None
    kv_heads = value(f"{arch}.attention.head_count_kv") or heads
    key_len = value(f"{arch}.attention.key_length") or embedding // heads
    value_len = value(f"{arch}.attention.value_length") or embedding // heads
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab = value(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else 32000)
    weights = sum(int(t.n_bytes) for t in reader.tensors) / 2**20
    return GgufShape(layers=layers, weights_mb=weights,
                     kv_bytes_per_token=layers * kv_heads * (key_len + value_len) * KV_BYTES, vocab=vocab)
