"""Workers never outlive the hive that started them."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)


async def watch_parent(on_gone: Callable[[], None], every_s: float = 1.0) -> None:
    """Call ``on_gone`` once the parent process is gone (this process was re-parented), then return."""
    parent = os.getppid()
    while True:
        await asyncio.sleep(every_s)
        if os.getppid() != parent:
            log.warning("the parent process %d is gone; stopping", parent)
            on_gone()
            return
