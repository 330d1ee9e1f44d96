"""Loading a model directory (EXL2, GPTQ or unquantized safetensors) into exllamav2 on the visible GPUs.

exllamav2 is imported here, lazily: a CPU install never touches it. The worker is pinned to its GPUs
with ``CUDA_VISIBLE_DEVICES`` by the hive, so the devices seen here are numbered from 0.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbee_fleet.common.vram import PAGE_SIZE, ExlOptions, round_to_page
from rbee_fleet.worker.backends.base import BackendError, WorkerSpec

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'rbee-fleet[gpu]' (exllamav2 with a CUDA build of torch); `rbee-hive --check` says what is missing"


@dataclass(frozen=True)
class ExLlamaV2Api:
    """The exllamav2 classes the backend uses, gathered in one place so tests can see every call."""

    Config: Any
    Model: Any
    Tokenizer: Any
    Generator: Any
    Job: Any
    Settings: Any
    caches: dict[str, Any]
    paged_attention: bool  # flash-attn >= 2.5.7 importable, as exllamav2 itself decided


def import_api() -> ExLlamaV2Api:
    """Import exllamav2; a missing or unbuildable install becomes a ``BackendError`` with the fix."""
    try:
        import exllamav2
        from exllamav2 import attn
        from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler
    except ImportError as exc:
        raise BackendError(f"exllamav2 cannot be imported ({exc}): {INSTALL_HINT}") from exc
    except OSError as exc:  # e.g. CUDA_HOME unset while exllamav2 compiles its extension on first import
        raise BackendError(f"exllamav2 could not build or load its CUDA extension ({exc}): {INSTALL_HINT}") from exc
    return ExLlamaV2Api(
        Config=exllamav2.ExLlamaV2Config,
        Model=exllamav2.ExLlamaV2,
        Tokenizer=exllamav2.ExLlamaV2Tokenizer,
        Generator=ExLlamaV2DynamicGenerator,
        Job=ExLlamaV2DynamicJob,
        Settings=ExLlamaV2Sampler.Settings,
        caches={
            "fp16": exllamav2.ExLlamaV2Cache,
            "q8": exllamav2.ExLlamaV2Cache_Q8,
            "q6": exllamav2.ExLlamaV2Cache_Q6,
            "q4": exllamav2.ExLlamaV2Cache_Q4,
        },
        paged_attention=bool(getattr(attn, "has_flash_attn_with_paged", False)),
    )


@dataclass(frozen=True)
class ChatConfig:
    """What ``tokenizer_config.json`` (and friends) say about chat formatting and special tokens."""

    template: str | None
    bos_token: str
    eos_token: str
    add_bos: bool

    @classmethod
    def read(cls, model_dir: Path, tokenizer: Any = None) -> ChatConfig:
        cfg = _json(model_dir / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if not template and (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
        if not template:
            template = _json(model_dir / "chat_template.json").get("chat_template")
        bos = _token_text(cfg.get("bos_token"))
        eos = _token_text(cfg.get("eos_token"))
        if bos is None and tokenizer is not None and "bos_token" not in cfg:
            bos = getattr(tokenizer, "bos_token", None)
        if eos is None and tokenizer is not None:
            eos = getattr(tokenizer, "eos_token", None)
        add_bos = cfg.get("add_bos_token")
        return cls(
            template=template if isinstance(template, str) and template else None,
            bos_token=bos or "",
            eos_token=eos or "",
            add_bos=add_bos if isinstance(add_bos, bool) else bos is not None,
        )


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise BackendError(f"{path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class LoadedModel:
    api: ExLlamaV2Api
    config: Any
    model: Any
    cache: Any
    tokenizer: Any
    generator: Any
    options: ExlOptions
    paged: bool
    batch_size: int
    context: int
    chat: ChatConfig
    stop_token_ids: frozenset[int]
    vram_used_mb: Callable[[], int | None] = field(default=lambda: None)


def load_model(spec: WorkerSpec, api: ExLlamaV2Api | None = None) -> LoadedModel:
    """Config, model, cache (lazy, sized from the request budget), weights, tokenizer and generator."""
    try:
        options = ExlOptions.parse(spec.options)
    except ValueError as exc:
        raise BackendError(str(exc)) from None
    model_dir = Path(spec.model_path)
    if not (model_dir / "config.json").is_file():
        raise BackendError(f"{model_dir} is not a model directory with a config.json (EXL2, GPTQ or safetensors)")
    api = api or load_api()
    config = api.Config(str(model_dir))
    native = int(config.max_seq_len)
    context = round_to_page(spec.ctx_size)
    if context > native:
        log.warning("ctx_size %d is beyond the model's trained context of %d tokens", context, native)
    config.max_seq_len = context
    config.max_input_len = min(int(config.max_input_len), context)
    config.max_attention_size = config.max_input_len**2
    config.arch_compat_overrides()

    available = api.paged_attention and not config.no_flash_attn
    if options.paged and not available:
        raise BackendError("option paged=true needs flash-attn >= 2.5.7 on an Ampere or newer GPU; "
                           "install flash-attn or leave paged unset")
    paged = available if options.paged is None else options.paged
    batch = options.batch_size(paged)
    cache_len = options.cache_len(context, paged)
    log.info("exllamav2: context %d, cache %s of %d tokens, %s, batch %d", context, options.cache, cache_len,
             "paged" if paged else "unpaged (no flash-attn >= 2.5.7)", batch)

    model = api.Model(config)
    cache_class = api.caches[options.cache]
    try:
        if options.gpu_split is not None:
            model.load(gpu_split=list(options.gpu_split), progress=False)
            cache = cache_class(model, max_seq_len=cache_len)  # allocated beside the layers it serves
        else:
            cache = cache_class(model, max_seq_len=cache_len, lazy=True)
            model.load_autosplit(cache, progress=False)
        tokenizer = api.Tokenizer(config)
        generator = api.Generator(model=model, cache=cache, tokenizer=tokenizer, max_batch_size=batch, paged=paged)
        if options.warmup:
            generator.warmup()
    except BackendError:
        raise
    except Exception as exc:  # noqa: BLE001 - out of memory, bad tensors, failed assertions: all say why
        raise BackendError(_load_failure(exc, model_dir, options)) from exc

    chat = ChatConfig.read(model_dir, tokenizer)
    return LoadedModel(
        api=api, config=config, model=model, cache=cache, tokenizer=tokenizer, generator=generator,
        options=options, paged=paged, batch_size=batch, context=context, chat=chat,
        stop_token_ids=stop_tokens(config, tokenizer, chat), vram_used_mb=_torch_vram_mb,
    )


def load_api() -> ExLlamaV2Api:
    """The real exllamav2 (tests put a stand-in here, named as one)."""
    return import_api()


def stop_tokens(config: Any, tokenizer: Any, chat: ChatConfig) -> frozenset[int]:
    """EOS ids from the tokenizer, ``generation_config.json`` and ``tokenizer_config.json``'s eos_token."""
    ids: set[int] = set()
    if isinstance(getattr(tokenizer, "eos_token_id", None), int):
        ids.add(tokenizer.eos_token_id)
    gen_eos = (getattr(config, "generation_config", None) or {}).get("eos_token_id") or []
    ids.update(t for t in gen_eos if isinstance(t, int))
    if chat.eos_token:
        tid = tokenizer.single_id(chat.eos_token)
        if isinstance(tid, int):
            ids.add(tid)
    return frozenset(ids)


def _load_failure(exc: Exception, model_dir: Path, options: ExlOptions) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError":
        return (f"out of GPU memory loading {model_dir} ({text}); try a quantized cache (cache=q4), "
                "a smaller ctx_size or max_batch_size, or more GPUs")
    if options.gpu_split is not None and "split" in str(exc).lower():
        return f"gpu_split {list(options.gpu_split)} does not fit the visible GPUs: {text}"
    return f"exllamav2 could not load {model_dir}: {text}"


def _torch_vram_mb() -> int | None:
    """Memory this process holds on its GPUs (torch's allocator, which holds weights and cache)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return sum(torch.cuda.memory_reserved(i) for i in range(torch.cuda.device_count())) // 2**20


__all__ = ["PAGE_SIZE", "ChatConfig", "ExLlamaV2Api", "LoadedModel", "import_api", "load_api", "load_model"]
