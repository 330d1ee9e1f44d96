"""Tokens: generated, stored with mode 0600, read back. Never logged."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def new_token() -> str:
    return secrets.token_urlsafe(32)


def write_secret(path: Path, value: str) -> None:
    """Write ``value`` so that only the owner can ever read it (created 0600, not chmod-ed after)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    os.replace(tmp, path)


def read_secret(path: Path | str) -> str:
    path = Path(path)
    mode = path.stat().st_mode & 0o077
    if mode:
        raise PermissionError(f"{path} is readable by others (mode {oct(path.stat().st_mode & 0o777)}); chmod 600 it")
    value = path.read_text().strip()
    if not value:
        raise ValueError(f"{path} is empty")
    return value


def load_or_create(path: Path) -> str:
    if path.exists():
        return read_secret(path)
    token = new_token()
    write_secret(path, token)
    return token
