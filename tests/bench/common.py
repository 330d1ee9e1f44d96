"""Shared pieces of the benchmarks: timing a streamed completion, medians, printing."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import aiohttp

from tests.support import procs

# The test inventories' fast cadence and short admission wait: a benchmark runs with a user's defaults.
TEST_ONLY_SETTINGS = ("heartbeat_interval_s = 0.5", "heartbeat_timeout_s = 2.0", "admission_timeout_s = 5")


def default_inventory(path, **kwargs):  # noqa: ANN001, ANN201 - procs.write_inventory's arguments
    """``procs.write_inventory`` without the test-only queen settings: the queen runs with its defaults."""
    inv = procs.write_inventory(path, **kwargs)
    lines = [line for line in inv.read_text().splitlines() if line.strip() not in TEST_ONLY_SETTINGS]
    inv.write_text("\n".join(lines) + "\n")
    return inv


@dataclass
class StreamTiming:
    ttft_s: float  # request sent -> first content chunk
    total_s: float  # request sent -> stream end
    chunks: int  # content chunks (one per token for these workers)

    @property
    def decode_tps(self) -> float:
        decode = self.total_s - self.ttft_s
        return (self.chunks - 1) / decode if self.chunks > 1 and decode > 0 else 0.0


async def time_stream(session: aiohttp.ClientSession, url: str, body: dict, headers: dict | None = None) -> StreamTiming:
    start = time.perf_counter()
    first = None
    chunks = 0
    async with session.post(url, json={**body, "stream": True}, headers=headers) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            # Content chunks only: not the role chunk, the finish chunk or the usage chunk.
            if (line.startswith(b"data: {") and b'"finish_reason":null' in line and b'"role"' not in line
                    and (b'"content":"' in line or b'"text":"' in line)):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    return StreamTiming((first or end) - start, end - start, chunks)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def header(title: str) -> None:
    print(f"\n== {title} ==")


def row(label: str, value: str) -> None:
    print(f"  {label:<48} {value}")
