"""The host aliases of the user's OpenSSH client config, read without an SSH library.

The inventory accepts a ``proxy_jump`` that names such an alias; anything else that is a bare word is
more likely a typo of a hive alias, and is reported as one.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

_HOST = re.compile(r"^\s*Host\s+(.+?)\s*$", re.IGNORECASE)


def config_path() -> Path:
    return Path.home() / ".ssh" / "config"


def host_patterns(path: Path | None = None) -> list[str]:
    """The ``Host`` patterns of the config (``Include`` files are not followed)."""
    try:
        text = (path or config_path()).read_text(errors="replace")
    except OSError:
        return []
    patterns: list[str] = []
    for line in text.splitlines():
        m = _HOST.match(line)
        if m:
            patterns += [p.strip('"') for p in m.group(1).split()]
    return patterns


def is_config_alias(name: str, path: Path | None = None) -> bool:
    """Whether ``name`` matches a ``Host`` pattern (other than a catch-all ``*``) and no negation."""
    patterns = host_patterns(path)
    if any(p.startswith("!") and fnmatch.fnmatch(name, p[1:]) for p in patterns):
        return False
    return any(p != "*" and not p.startswith("!") and fnmatch.fnmatch(name, p) for p in patterns)
