"""``rbee-keeper lock status|release``: who holds the fleet lock of this inventory, and taking it back."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from rich.markup import escape

from rbee_fleet.contracts.vocabulary import ExitCode
from rbee_fleet.keeper.cli.console import emit_json, err, out
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.fleet_change import audit_log, fleet_lock


async def lock_status(args: argparse.Namespace, ctx: KeeperContext) -> int:
    lock = fleet_lock(ctx)
    holder = lock.holder()
    alive = holder.alive() if holder else None
    if args.json:
        emit_json({"locked": holder is not None, "inventory": lock.inventory, "file": str(lock.path),
                   "holder": {**asdict(holder), "alive": alive} if holder else None})
    elif holder is None:
        out.print(f"the fleet of {escape(lock.inventory)} is not locked")
    else:
        state = {True: "running", False: "gone: stale, the next operation takes it over", None: "on another host"}[alive]
        out.print(f"the fleet of {escape(lock.inventory)} is locked by {escape(holder.describe())} "
                  f"(process {state}); lock file {lock.path}")
    return ExitCode.OK if holder is None else ExitCode.FAILED


async def lock_release(args: argparse.Namespace, ctx: KeeperContext) -> int:
    lock = fleet_lock(ctx, lambda message: err.print(f"[yellow]warning:[/] {escape(message)}"))
    removed = lock.force_release(force=args.force)  # OperationFailed for a live holder: exit 1
    if removed is not None:
        audit_log(ctx).record("lock release", [lock.inventory], "ok",
                              f"removed the lock of {removed.describe()}" + (" (--force)" if args.force else ""))
    if args.json:
        emit_json({"ok": True, "released": asdict(removed) if removed else None})
    elif removed is None:
        out.print("the fleet was not locked")
    else:
        out.print(f"released the fleet lock of {escape(removed.describe())}")
    return ExitCode.OK
