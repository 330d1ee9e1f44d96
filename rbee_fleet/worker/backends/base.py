"""The interface every inference backend implements, and the types that cross it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from rbee_fleet.contracts.capabilities import LEGACY


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is asked to load and how."""

    model_id: str
    model_path: str
    backend: str
    device: str = "cpu"
    ctx_size: int = 2048
    threads: int | None = None
    max_queue: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    slots: int | None = None  # parallel sequences (llama-server); None: the engine's default
    embeddings: bool = False  # serve /v1/embeddings (llama-server)
    gpu_layers: int | None = None  # llama-server on a GPU: layers offloaded (None: all that fit)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class Piece:
    """Text produced by ``tokens`` more tokens (text may be empty while bytes or stops are held back)."""

    text: str
    tokens: int = 1


@dataclass(frozen=True)
class Finish:
    reason: Literal["stop", "length", "cancelled"]
    completion_tokens: int


class BackendError(Exception):
    """The backend cannot load or run (missing library, bad model file, no device)."""


class Backend(ABC):
    """One loaded model. ``stream`` may be called concurrently up to ``slots`` times."""

    name: ClassVar[str]
    # What requests this backend can honour (contracts.capabilities); others are refused with a 400.
    capabilities: ClassVar[frozenset[str]] = LEGACY

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        # Counted by the generation thread itself: shows that a cancelled request really stopped.
        self.decoded_total = 0

    @property
    @abstractmethod
    def context_length(self) -> int: ...

    @property
    def slots(self) -> int:
        return 1

    @abstractmethod
    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The model's own chat template applied to OpenAI-style messages."""

    @abstractmethod
    def tokenize(self, text: str, *, templated: bool) -> list[int]:
        """Token ids for ``text``; ``templated`` text already carries the model's special tokens."""

    @abstractmethod
    def stream(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Piece | Finish]:
        """Generate from ``prompt``; ends with one ``Finish``. Closing the iterator cancels."""

    def check_budget(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse (``ContextOverflow``) what cannot fit before any stream starts; the default fits in context."""

    def stats(self) -> dict[str, Any]:
        """Backend figures for the heartbeat (cache, VRAM); empty when there are none."""
        return {}

    def close(self) -> None:
        """Free the model."""
