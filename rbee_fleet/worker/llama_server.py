"""llama.cpp's own HTTP server as the engine of a CPU worker: find it, start it, read its state.

``llama-server`` does the serving (continuous batching over ``slots`` parallel sequences, the whole
OpenAI surface: tools, grammars, logprobs, infill, embeddings, the Responses and Anthropic APIs); the
queen sends requests straight to it. The worker only starts it, watches it and reports its state.
"""

from __future__ import annotations

import ctypes
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rbee_fleet.common.llama_engine import engine_env, engine_name
from rbee_fleet.contracts.vocabulary import device_ids
from rbee_fleet.worker.backends.base import BackendError

# What llama-server can do for every model (a worker started for embeddings does only that). "infill"
# (``suffix``) is added for a model with fill-in-the-middle tokens: the queen writes them into the prompt.
BASE_CAPABILITIES = ("chat", "completion", "tools", "json", "logprobs", "n", "responses", "messages")
# Fill-in-the-middle markers (prefix, suffix, middle) as model families spell them, for GGUF files whose
# metadata does not name them by id (llama.cpp looks for the same spellings).
FIM_SPELLINGS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SantaCoder
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, Granite
    ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
    ("<PRE>", "<SUF>", "<MID>"),  # CodeLlama
)
FIM_ID_KEYS = ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.fim_mid_token_id")
CACHE_REUSE_MIN_TOKENS = 256
OPTION_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,40}$")
# Flags the worker sets itself: an option may not override them.
RESERVED = frozenset({"model", "m", "host", "port", "api-key", "api-key-file", "ctx-size", "c", "parallel", "np",
                      "threads", "t", "alias", "a", "embeddings", "embedding", "metrics", "slots",
                      "device", "dev", "gpu-layers", "n-gpu-layers", "ngl", "log-verbosity", "verbosity", "lv"})
PR_SET_PDEATHSIG = 1
TOOLS_TEMPLATE = Path(__file__).parent / "chat_templates" / "chatml-tools.jinja"
# Jinja that is true when a conversation involves tools: then the tools template renders it.
_USES_TOOLS = (
    "{%- set rbee = namespace(tools=(tools is defined and tools)) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'tool' or (m['tool_calls'] is defined and m['tool_calls']) -%}"
    "{%- set rbee.tools = true -%}{%- endif -%}{%- endfor -%}"
)


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    model_id: str
    host: str
    port: int
    ctx_size: int  # per sequence: llama-server gets ctx_size x slots in all
    slots: int
    threads: int | None = None  # None: llama-server's own default
    embeddings: bool = False
    api_key_file: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    chat_template_file: str | None = None  # replaces the model's own (see ``tool_template``)
    fim_tokens: tuple[str, str, str] | None = None  # the model's fill-in-the-middle markers, if it has them
    device: str = "cpu"  # the fleet's device: cpu, cuda:0, vulkan:0,1, metal
    gpu_layers: int | None = None  # None: every layer that fits (llama.cpp's own fitting to free memory)

    def command(self, binary: Path) -> list[str]:
        cmd = [
            str(binary),
            "--model", self.model_path,
            "--alias", self.model_id,
            "--host", self.host,
            "--port", str(self.port),
            "--ctx-size", str(self.ctx_size * self.slots),
            "--parallel", str(self.slots),
            "--jinja",  # the model's own chat template, with tool calls
            "--metrics",
            "--slots",
            "--no-webui",
            # Keep each slot's prompt in its KV cache (cache_prompt is llama-server's default) and reuse its
            # chunks of at least this many tokens by shifting them, so a conversation's next turn sent here
            # (the queen routes by prefix) reads only its new tokens.
            "--cache-reuse", str(CACHE_REUSE_MIN_TOKENS),
        ]
        gpus = device_ids(self.device)
        if gpus:
            # On these GPUs only; without a layer count llama.cpp offloads what fits their free memory
            # (split between several by free memory), and says so in its log.
            cmd += ["--device", ",".join(engine_name(d) for d in gpus)]
            if self.gpu_layers is not None:
                cmd += ["--n-gpu-layers", str(self.gpu_layers)]
            # Its load lines (layers offloaded, each device's buffers) are debug-level: the worker reads
            # them to report where the model went and the memory it holds.
            cmd += ["--log-verbosity", "4"]
        else:
            cmd += ["--device", "none"]  # a CPU worker stays on the CPU, even beside a visible GPU
        if self.threads:
            cmd += ["--threads", str(self.threads), "--threads-batch", str(self.threads)]
        if self.embeddings:
            cmd.append("--embeddings")
            if "pooling" not in dict(self.options):
                cmd += ["--pooling", "mean"]  # OpenAI's embeddings are one vector per input
        if self.api_key_file:
            cmd += ["--api-key-file", self.api_key_file]
        if self.chat_template_file:
            cmd += ["--chat-template-file", self.chat_template_file]
        cmd += option_flags(dict(self.options))
        return cmd

    @property
    def capabilities(self) -> list[str]:
        # llama-server's --embeddings restricts it to embeddings: such a worker generates nothing.
        if self.embeddings:
            return ["embeddings"]
        return [*BASE_CAPABILITIES, "infill"] if self.fim_tokens else list(BASE_CAPABILITIES)


@dataclass(frozen=True)
class ModelFacts:
    """What the worker reads from a GGUF file's metadata before llama-server loads it."""

    chat_template: str | None = None
    fim_tokens: tuple[str, str, str] | None = None  # prefix, suffix, middle markers


def model_facts(model_path: str) -> ModelFacts:
    """The chat template and fill-in-the-middle tokens of a GGUF file (``gguf`` package, no model load)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return ModelFacts()
    try:
        fields = GGUFReader(model_path).fields
    except (OSError, ValueError):
        return ModelFacts()

    def text(name: str) -> str | None:
        field = fields.get(name)
        if field is None or not field.data:
            return None
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")

    return ModelFacts(chat_template=text("tokenizer.chat_template"), fim_tokens=_fim_tokens(fields))


def _fim_tokens(fields: Any) -> tuple[str, str, str] | None:
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        return None

    def token(i: int) -> str:
        return bytes(tokens.parts[tokens.data[i]]).decode("utf-8", errors="replace")

    ids = []
    for key in FIM_ID_KEYS:
        field = fields.get(key)
        if field is None or not field.data:
            break
        ids.append(int(field.parts[field.data[0]][0]))
    if len(ids) == 3 and all(0 <= i < len(tokens.data) for i in ids):
        return token(ids[0]), token(ids[1]), token(ids[2])
    vocab = {token(i) for i in range(len(tokens.data))}
    return next((spelling for spelling in FIM_SPELLINGS if all(t in vocab for t in spelling)), None)


def tool_template(own: str | None) -> str | None:
    """For a ChatML model whose own template cannot describe tools: its template with function calling
    added in front (llama-server would otherwise drop ``tools`` silently). None when no change is needed
    or none is known (the worker then does not offer tools)."""
    if not own or "<|im_start|>" not in own or "tools" in own:
        return None
    ours = TOOLS_TEMPLATE.read_text()
    return f"{_USES_TOOLS}{{%- if rbee.tools -%}}{ours}{{%- else -%}}{own}{{%- endif -%}}"


def option_flags(options: dict[str, Any]) -> list[str]:
    """Backend options as llama-server flags: ``{"cache_type_k": "q8_0"}`` -> ``--cache-type-k q8_0``."""
    flags: list[str] = []
    for key, value in options.items():
        if not OPTION_NAME.match(key):
            raise BackendError(f"option {key!r} is not a llama-server flag name")
        flag = key.replace("_", "-")
        if flag in RESERVED:
            raise BackendError(f"option {key!r} is set by the worker itself (use the worker's own setting)")
        if value is True:
            flags.append(f"--{flag}")
        elif value is False or value is None:
            flags.append(f"--no-{flag}")
        else:
            flags += [f"--{flag}", str(value)]
    return flags


def _die_with_parent() -> None:
    """In the child before exec: be killed when the worker dies, however it dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def spawn(config: EngineConfig, binary: Path) -> subprocess.Popen[bytes]:
    """Start llama-server; its output goes on to the worker's own (the worker's log) through ``Offload``."""
    try:
        return subprocess.Popen(config.command(binary), stdin=subprocess.DEVNULL, env=engine_env(binary),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)  # noqa: PLW1509 - only prctl, before exec
    except OSError as exc:
        raise BackendError(f"cannot start {binary}: {exc.strerror}") from None


# llama.cpp's load log: where the layers went and the memory each device holds.
_OFFLOADED = re.compile(rb"offloaded (\d+)/(\d+) layers to GPU")
_BUFFER = re.compile(rb"\b([A-Za-z]+\d+)(?:_\w+)? (model|KV|compute|RS) buffer size = +([\d.]+) MiB")


@dataclass
class Offload:
    """What llama-server's own output says about its GPU use, read as the output passes to the log."""

    layers: tuple[int, int] | None = None  # (on GPUs, of all)
    buffers_mb: dict[str, float] = field(default_factory=dict)  # "Vulkan0 model" -> MiB
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def read(self, line: bytes) -> None:
        found = _OFFLOADED.search(line)
        if found:
            with self._lock:
                self.layers = (int(found[1]), int(found[2]))
        for dev, kind, mib in _BUFFER.findall(line):
            if dev.startswith((b"CPU", b"Host")):
                continue
            with self._lock:
                key = f"{dev.decode()} {kind.decode()}"
                self.buffers_mb[key] = self.buffers_mb.get(key, 0.0) + float(mib)

    @property
    def gpu_memory_mb(self) -> int | None:
        """The memory llama-server allocated on GPUs (weights, KV cache, compute), None when on none."""
        with self._lock:
            return round(sum(self.buffers_mb.values())) if self.buffers_mb else None

    def relay(self, stream: IO[bytes], sink: IO[bytes] | None = None) -> threading.Thread:
        """Copy ``stream`` to ``sink`` (the worker's stderr: its log) line by line, reading each line."""
        out = sink or sys.stderr.buffer

        def run() -> None:
            for line in iter(stream.readline, b""):
                self.read(line)
                try:
                    out.write(line)
                    out.flush()
                except (OSError, ValueError):
                    pass

        thread = threading.Thread(target=run, name="llama-server-log", daemon=True)
        thread.start()
        return thread


# -- reading its state ---------------------------------------------------------------------------

_METRIC_LINE = re.compile(r"^llamacpp:(\w+)(?:\{[^}]*\})?\s+([-+0-9.eE]+|nan|NaN|inf)\s*$")


def parse_metrics(text: str) -> dict[str, float]:
    """llama-server's Prometheus text as ``{name: value}`` (names without the ``llamacpp:`` prefix)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC_LINE.match(line.strip())
        if match:
            try:
                values[match.group(1)] = float(match.group(2))
            except ValueError:
                continue
    return values


@dataclass(frozen=True)
class EngineStats:
    slots_total: int
    slots_busy: int
    context_per_slot: int
    queue_depth: int
    tokens_predicted_total: int
    prompt_tokens_total: int
    requests_total: int
    cache_tokens_used: int | None

    @classmethod
    def read(cls, slots: list[dict[str, Any]], metrics: dict[str, float]) -> EngineStats:
        busy = sum(1 for s in slots if s.get("is_processing"))
        n_ctx = max((int(s.get("n_ctx") or 0) for s in slots), default=0)
        used = metrics.get("kv_cache_tokens")
        return cls(
            slots_total=len(slots) or 1,
            slots_busy=busy,
            context_per_slot=n_ctx,
            queue_depth=int(metrics.get("requests_deferred", 0)),
            tokens_predicted_total=int(metrics.get("tokens_predicted_total", 0)),
            prompt_tokens_total=int(metrics.get("prompt_tokens_total", 0)),
            requests_total=0,  # llama-server counts tokens, not requests; the queen counts requests (its metrics)
            cache_tokens_used=int(used) if used is not None else None,
        )
