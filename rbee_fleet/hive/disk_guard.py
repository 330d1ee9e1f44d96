"""Downloads that cannot fill the disk: refuse before writing, stop a body that outgrows its size.

A download's declared size (``Content-Length``, or the file sizes the Hugging Face hub lists) is checked
against the free space of the catalog's filesystem, keeping a margin, before a byte is written. While
it runs, a body that goes past its declared length is stopped, and so is one of unknown length once
the disk would fall below the margin.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rbee_fleet.common.errors import OperationFailed

MARGIN_BYTES = 512 * 2**20  # always left free on the catalog's filesystem
CHECK_EVERY_BYTES = 64 * 2**20  # how often a download of unknown length looks at free space


def free_bytes(where: Path) -> int:
    return shutil.disk_usage(where).free


def human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def require_room(declared: int | None, where: Path, source: str) -> None:
    """Refuse ``source`` when its declared size does not fit in ``where``'s free space, less the margin."""
    if declared is None:
        return
    free = free_bytes(where)
    if declared + MARGIN_BYTES > free:
        raise OperationFailed(
            f"{source}: refusing to download {human(declared)}: only {human(free)} free on the disk of {where} "
            f"(and {human(MARGIN_BYTES)} are always kept free); nothing was written"
        )


class BodyGuard:
    """Counts a body's bytes as they arrive; stops it past its declared length or on a filling disk."""

    def __init__(self, declared: int | None, where: Path, source: str) -> None:
        self.declared = declared
        self.where = where
        self.source = source
        self.received = 0
        self._next_check = CHECK_EVERY_BYTES

    def add(self, n: int) -> None:
        self.received += n
        if self.declared is not None:
            if self.received > self.declared:
                raise OperationFailed(
                    f"{self.source}: the server sent more than the {self.declared} bytes it declared; "
                    "download stopped and discarded"
                )
            return
        if self.received >= self._next_check:
            self._next_check = self.received + CHECK_EVERY_BYTES
            free = free_bytes(self.where)
            if free < MARGIN_BYTES:
                raise OperationFailed(
                    f"{self.source}: download stopped after {human(self.received)}: only {human(free)} left free "
                    f"on the disk of {self.where} (its size was not declared)"
                )
