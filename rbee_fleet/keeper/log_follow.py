"""Following a local log file like ``tail -n LINES -F`` (the embedded host's log is the queen's)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

LOG_POLL_S = 0.5


async def follow_file(path: Path, lines: int = 200, poll_s: float = LOG_POLL_S) -> AsyncIterator[str]:
    """Tail ``path`` like ``tail -n LINES -F``: survives the file being absent, truncated or replaced."""
    position = 0
    inode: int | None = None
    waiting_said = False
    first = True
    while True:
        try:
            stat = await asyncio.to_thread(path.stat)
        except FileNotFoundError:
            if not waiting_said:
                yield f"(no log at {path} yet; waiting for it)"
                waiting_said = True
            await asyncio.sleep(poll_s)
            continue
        if inode != stat.st_ino or stat.st_size < position:
            inode, position = stat.st_ino, 0
        if stat.st_size > position:
            chunk, position = await asyncio.to_thread(_read_from, path, position)
            text = chunk.decode("utf-8", errors="replace").splitlines()
            for line in text[-lines:] if first else text:
                yield line
        first = False
        await asyncio.sleep(poll_s)


def _read_from(path: Path, position: int) -> tuple[bytes, int]:
    with open(path, "rb") as fh:
        fh.seek(position)
        data = fh.read()
        # Keep a partial last line for the next read.
        cut = data.rfind(b"\n") + 1
        return data[:cut], position + cut
