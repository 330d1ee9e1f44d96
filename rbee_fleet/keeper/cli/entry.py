"""rbee-keeper (alias rbee): parse the command line, then run the one command asked for.

A command's module is imported only when that command runs (``parser`` names each handler as
``"module:function"``): a keeper command pays for the libraries it uses, not for every command's.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys

from rbee_fleet.contracts.vocabulary import ExitCode
from rbee_fleet.keeper.cli.parser import build_parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "tui" or (args.command is None and sys.stdin.isatty() and sys.stdout.isatty()):
        sys.exit(_tui(args))
    if getattr(args, "func", None) is None:
        parser.print_help()
        sys.exit(ExitCode.USAGE)
    try:
        code = asyncio.run(run(args))
    except KeyboardInterrupt:
        code = ExitCode.INTERRUPTED
    sys.exit(code)


async def run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from rbee_fleet.common.errors import ApiError, OperationFailed
    from rbee_fleet.common.inventory import InventoryError
    from rbee_fleet.keeper.cli.console import err, fail
    from rbee_fleet.keeper.context import KeeperContext
    from rbee_fleet.keeper.deploy_lock import FleetLocked
    from rbee_fleet.keeper.queen_client import QueenUnreachable

    try:
        ctx = KeeperContext.load(getattr(args, "inventory", None))
    except InventoryError as exc:
        err.print(f"[red]inventory error:[/] {escape(str(exc))}", soft_wrap=True)
        return ExitCode.USAGE
    module, _, name = args.func.partition(":")
    handler = getattr(importlib.import_module(f"rbee_fleet.keeper.cli.{module}"), name)
    try:
        return await handler(args, ctx)
    except QueenUnreachable as exc:
        fail(args, str(exc))
        return ExitCode.NO_QUEEN
    except FleetLocked as exc:
        fail(args, str(exc))
        return ExitCode.LOCKED
    except (OperationFailed, ApiError) as exc:
        fail(args, str(exc))
        return ExitCode.FAILED


def _tui(args: argparse.Namespace) -> int:
    try:
        from rbee_fleet.tui.app import run_tui
    except ImportError as exc:
        print(f"rbee-keeper: the TUI needs the keeper extra (pip install 'rbee-fleet[keeper]'): {exc}", file=sys.stderr)
        return ExitCode.USAGE
    return run_tui(getattr(args, "inventory", None), refresh_s=getattr(args, "refresh", 1.0))


if __name__ == "__main__":
    main()
