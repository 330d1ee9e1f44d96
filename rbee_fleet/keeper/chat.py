"""Chat through the queen with the official openai client, measuring time to first token and tokens/s.

The CLI (`infer`, `demo`) and the TUI's chat screen both stream answers through ``ChatStream``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.keeper.queen_client import QueenUnreachable


@dataclass(frozen=True)
class ChatStats:
    tokens: int
    ttft_ms: float | None  # None when no token came
    tokens_per_s: float
    total_s: float

    def summary(self) -> str:
        first = f"{self.ttft_ms:.0f} ms" if self.ttft_ms is not None else "n/a"
        return f"{self.tokens} tokens, first token after {first}, {self.tokens_per_s:.1f} tokens/s"


def openai_client(base_url: str, api_key: str | None) -> Any:
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key=api_key or "not-needed", max_retries=0)


def openai_message(exc: Any) -> str:
    """The human message inside an OpenAI error envelope, else the exception's text."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        detail = body.get("error", body)
        if isinstance(detail, dict) and detail.get("message"):
            return str(detail["message"])
    return str(exc)


class ChatStream:
    """One streamed chat completion: iterate for text pieces; ``stats`` is set once the stream ends.

    Connection failures raise ``QueenUnreachable``; errors the queen reports raise ``OperationFailed``
    with the queen's own message.
    """

    def __init__(self, oai: Any, queen_url: str, model: str, messages: list[dict[str, str]], *,
                 max_tokens: int = 256, temperature: float = 0.7, seed: int | None = None) -> None:
        self._oai = oai
        self._queen_url = queen_url
        self._request: dict[str, Any] = {
            "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
            "seed": seed, "stream": True, "stream_options": {"include_usage": True},
        }
        self.stats: ChatStats | None = None
        self.text = ""
        self._started: float | None = None
        self._first: float | None = None
        self._pieces = 0  # content chunks so far: one token each from llama-server

    @property
    def first_token_ms(self) -> float | None:
        """Time to the first token, once it came (None before)."""
        if self._first is None or self._started is None:
            return None
        return (self._first - self._started) * 1000

    def running(self) -> str:
        """The stats line while the answer streams: the first token's time, and tokens/s so far."""
        if self.stats is not None:
            return self.stats.summary()
        ttft = self.first_token_ms
        if ttft is None or self._first is None:
            return "waiting for the first token…"
        elapsed = time.monotonic() - self._first
        if self._pieces < 2 or elapsed <= 0:
            return f"first token after {ttft:.0f} ms"
        return (f"first token after {ttft:.0f} ms, {self._pieces} tokens, "
                f"{(self._pieces - 1) / elapsed:.1f} tokens/s so far")

    async def __aiter__(self) -> AsyncIterator[str]:
        import openai

        started = self._started = time.monotonic()
        first: float | None = None
        usage = None
        try:
            stream = await self._oai.chat.completions.create(**self._request)
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    piece = choice.delta.content
                    if piece:
                        if first is None:
                            first = self._first = time.monotonic()
                        self._pieces += 1
                        self.text += piece
                        yield piece
        except openai.APIConnectionError:
            raise QueenUnreachable(self._queen_url, "connection refused") from None
        except openai.APIError as exc:
            raise OperationFailed(openai_message(exc)) from None
        total = time.monotonic() - started
        tokens = usage.completion_tokens if usage else 0
        decode = total - (first - started) if first is not None else total
        rate = (tokens - 1) / decode if tokens > 1 and decode > 0 else 0.0
        ttft = (first - started) * 1000 if first is not None else None
        self.stats = ChatStats(tokens=tokens, ttft_ms=ttft, tokens_per_s=rate, total_s=total)
