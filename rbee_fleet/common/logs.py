"""Logging for the daemons: one plain line per record, to stderr (a file when supervised)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

MAX_LOG_BYTES = 10 * 2**20
KEEP_LOGS = 3


def setup_logging(program: str, level: str | None = None) -> None:
    level = (level or os.environ.get("RBEE_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)-7s {program} %(name)s: %(message)s",
    )
    # aiohttp logs every access at INFO; the daemons keep their own metrics instead.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def rotate_if_large(path: Path, max_bytes: int = MAX_LOG_BYTES, keep: int = KEEP_LOGS) -> None:
    """Before a daemon reopens its log: move a large one to .1 (then .2 ...), so logs never fill a disk."""
    try:
        if path.stat().st_size < max_bytes:
            return
    except FileNotFoundError:
        return
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{n + 1}"))
    path.replace(path.with_name(f"{path.name}.1"))


def set_process_title(title: str) -> None:
    """What ``ps`` and ``pkill`` show for this process (``llm-worker-rbee smollm2``), not ``python -m ...``."""
    try:
        import setproctitle
    except ImportError:  # an install without it still runs; ps shows the command line
        return
    setproctitle.setproctitle(title)
