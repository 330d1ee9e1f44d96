"""Where the CLI writes: results on stdout (``out``, or JSON with ``--json``), progress and errors on stderr."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.markup import escape


def _console(stderr: bool) -> Console:
    probe = Console(stderr=stderr)
    # Logs and pipes get wide lines instead of rich's 80-column default.
    return Console(stderr=stderr, highlight=False, width=None if probe.is_terminal else 160)


out = _console(stderr=False)
err = _console(stderr=True)


def fail(args: argparse.Namespace, message: str) -> None:
    """Report a failed command: on stderr, and as ``{"ok": false, "error"}`` on stdout with ``--json``."""
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": message}))
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))
