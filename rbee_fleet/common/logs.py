"""Logging for the daemons: one plain line per record, to stderr (a file when supervised)."""

from __future__ import annotations

import logging
import os


def setup_logging(program: str, level: str | None = None) -> None:
    level = (level or os.environ.get("RBEE_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)-7s {program} %(name)s: %(message)s",
    )
    # aiohttp logs every access at INFO; the daemons keep their own metrics instead.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
