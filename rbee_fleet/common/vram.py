"""How much GPU memory an exllamav2 worker takes, and how its cache is sized.

Shared by the worker (which sizes its cache this way) and by placement (which must predict that size
before the worker exists), so the two cannot disagree. Pure arithmetic on a model's ``config.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rbee_fleet.common.gpu_fit import Need

PAGE_SIZE = 256  # exllamav2's paged-attention page; the cache length must be a multiple of it
DEFAULT_BATCH = 4  # concurrent sequences of a paged (flash-attn) worker unless max_batch_size says otherwise
DEFAULT_OVERHEAD_MB = 768  # CUDA context, activations of one prefill chunk, allocator slack

CacheType = Literal["fp16", "q8", "q6", "q4"]
# Bytes per cached element: FP16, or 8/6/4-bit values plus exllamav2's FP16 scales (one per 32 values).
CACHE_BYTES: dict[str, float] = {"fp16": 2.0, "q8": 1.0 + 2 / 32, "q6": 0.75 + 2 / 32, "q4": 0.5 + 2 / 32}


def round_to_page(tokens: int) -> int:
    return max(PAGE_SIZE, math.ceil(tokens / PAGE_SIZE) * PAGE_SIZE)


@dataclass(frozen=True)
class ExlOptions:
    """The exllamav2 worker's options (``--option KEY=VALUE`` / the inventory's ``options``), validated."""

    cache: CacheType = "fp16"
    gpu_split: tuple[float, ...] | None = None  # GB per visible GPU; None: load_autosplit
    max_batch_size: int = DEFAULT_BATCH
    cache_tokens: int | None = None  # total cache tokens; None: context x batch
    paged: bool | None = None  # None: paged when flash-attn >= 2.5.7 is usable
    top_k: int = 0  # 0: off, as OpenAI has no top_k
    min_p: float = 0.0
    warmup: bool = True

    KEYS = ("cache", "gpu_split", "max_batch_size", "cache_tokens", "paged", "top_k", "min_p", "warmup")

    @classmethod
    def parse(cls, options: dict[str, Any]) -> ExlOptions:
        """Raise ``ValueError`` naming the option when one is unknown or malformed."""
        unknown = sorted(set(options) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"unknown exllamav2 option(s) {', '.join(unknown)}; known: {', '.join(cls.KEYS)}")
        kw: dict[str, Any] = {}
        if "cache" in options:
            cache = str(options["cache"]).lower()
            if cache not in CACHE_BYTES:
                raise ValueError(f"option cache={options['cache']!r}: use one of {', '.join(CACHE_BYTES)}")
            kw["cache"] = cache
        if "gpu_split" in options:
            kw["gpu_split"] = _split(options["gpu_split"])
        for key in ("max_batch_size", "cache_tokens", "top_k"):
            if key in options and options[key] is not None:
                kw[key] = _int(key, options[key], minimum=0 if key == "top_k" else 1)
        if "min_p" in options:
            try:
                kw["min_p"] = float(options["min_p"])
            except (TypeError, ValueError):
                raise ValueError(f"option min_p={options['min_p']!r}: expected a number") from None
        for key in ("paged", "warmup"):
            if key in options:
                kw[key] = _bool(key, options[key], allow_auto=key == "paged")
        return cls(**kw)

    def batch_size(self, paged: bool) -> int:
        """Concurrent sequences: the configured batch when paged, always one without paged attention."""
        return self.max_batch_size if paged else 1

    def cache_len(self, context: int, paged: bool) -> int:
        """Tokens in the shared cache: room for ``batch`` full contexts unless ``cache_tokens`` says otherwise."""
        if self.cache_tokens is not None:
            tokens = self.cache_tokens
            # Without pages the cache holds exactly one sequence; it must hold a whole context.
            return round_to_page(max(tokens, context) if not paged else tokens)
        return round_to_page(context * self.batch_size(paged))


def _split(value: Any) -> tuple[float, ...] | None:
    if value in (None, "auto", ""):
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        split = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"option gpu_split={value!r}: expected 'auto' or GB per GPU, e.g. [20, 24]") from None
    if not split or any(p <= 0 for p in split):
        raise ValueError(f"option gpu_split={value!r}: every GPU needs a positive number of GB")
    return split


def _int(key: str, value: Any, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {key}={value!r}: expected a whole number") from None
    if number < minimum or (isinstance(value, float) and value != number):
        raise ValueError(f"option {key}={value!r}: expected a whole number >= {minimum}")
    return number


def _bool(key: str, value: Any, allow_auto: bool) -> bool | None:
    if allow_auto and value in (None, "auto"):
        return None
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"option {key}={value!r}: expected true or false{' or auto' if allow_auto else ''}")


@dataclass(frozen=True)
class ModelShape:
    """What of a transformer's ``config.json`` decides the size of its KV cache."""

    layers: int
    kv_heads: int
    head_dim: int
    max_context: int

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelShape:
        path = Path(model_dir) / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read the model's config: {exc}") from None
        cfg = cfg.get("text_config", cfg) if "num_hidden_layers" not in cfg else cfg
        try:
            layers = int(cfg["num_hidden_layers"])
            heads = int(cfg["num_attention_heads"])
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: missing or bad {exc} for sizing the cache") from None
        return cls(layers, kv_heads, head_dim, int(cfg.get("max_position_embeddings") or 0))

    def cache_bytes_per_token(self, cache: str) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * CACHE_BYTES[cache]


@dataclass(frozen=True)
class VramNeed:
    weights_mb: int
    cache_mb: int
    overhead_mb: int
    cache_tokens: int

    @property
    def total_mb(self) -> int:
        return self.weights_mb + self.cache_mb + self.overhead_mb

    def as_need(self) -> Need:
        """For placement: weights and cache can be split across GPUs, the overhead is paid on each."""
        return Need(shared_mb=self.weights_mb + self.cache_mb, per_gpu_mb=self.overhead_mb)

    def describe(self) -> str:
        return (f"{self.total_mb} MB ({self.weights_mb} weights + {self.cache_mb} cache for "
                f"{self.cache_tokens} tokens + {self.overhead_mb} overhead)")


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files on disk (what the GPU holds, give or take a few percent)."""
    root = Path(model_dir)
    return sum(p.stat().st_size for p in root.glob("*.safetensors")) or sum(
        p.stat().st_size for p in root.rglob("*") if p.is_file()
    )


def estimate(
    model_dir: str | Path, context: int, options: ExlOptions, *, paged: bool, overhead_mb: int = DEFAULT_OVERHEAD_MB
) -> VramNeed:
    """The VRAM an exllamav2 worker for ``model_dir`` will use: weights on disk + cache + overhead."""
    shape = ModelShape.from_dir(model_dir)
    tokens = options.cache_len(round_to_page(context), paged)
    return VramNeed(
        weights_mb=math.ceil(weights_bytes(model_dir) / 2**20),
        cache_mb=math.ceil(shape.cache_bytes_per_token(options.cache) * tokens / 2**20),
        overhead_mb=overhead_mb,
        cache_tokens=tokens,
    )
