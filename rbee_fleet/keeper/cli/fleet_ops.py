"""Fleet-wide commands of the CLI: ``down --fleet`` and ``hive forget-key``, and how the host commands set up
``HostService`` (the fleet lock's ``--wait-lock``, where its warnings go)."""

from __future__ import annotations

import argparse
import asyncio
import json

from rich.markup import escape

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.inventory import InventoryError
from rbee_fleet.contracts.fleet import FleetStatus
from rbee_fleet.contracts.vocabulary import ExitCode
from rbee_fleet.deploy.errors import WheelhouseError
from rbee_fleet.deploy.runner import HostResult
from rbee_fleet.keeper.cli.console import err, out
from rbee_fleet.keeper.cli.deploy_view import DeployView, results_table, summary
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.hosts.probe import HostProbe
from rbee_fleet.keeper.hosts.service import HostService
from rbee_fleet.keeper.queen_service import QueenService


def host_service(args: argparse.Namespace, queen: QueenService) -> HostService:
    """The host service of a CLI command: ``--wait-lock`` applied, lock warnings on stderr."""
    hosts = HostService(queen)
    hosts.changes.wait_s = max(0.0, getattr(args, "wait_lock", 0.0) or 0.0)
    hosts.changes.warn = lambda message: err.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)
    return hosts


# -- hive forget-key ALIAS ---------------------------------------------------------------------------


async def forget_key(args: argparse.Namespace, ctx: KeeperContext) -> int:
    queen = QueenService(ctx)
    try:
        hosts = host_service(args, queen)
        try:
            hosts.specs(args.alias)  # an unknown alias is an inventory error
        except InventoryError as exc:
            err.print(f"[red]inventory error:[/] {escape(str(exc))}")
            return ExitCode.USAGE
        path, removed = hosts.forget_host_key(args.alias)
    finally:
        await queen.close()
    if args.json:
        print(json.dumps({"ok": True, "host": args.alias, "file": str(path), "removed": removed}))
    elif removed:
        out.print(f"{args.alias}: removed {removed} key entr{'y' if removed == 1 else 'ies'} from {path}; the next "
                  "connection shows the host's key to trust again (--accept-new-host-keys, or the TUI's host menu)")
    else:
        out.print(f"{args.alias}: no entry in {path} (keys in ~/.ssh/known_hosts are removed with ssh-keygen -R)")
    return ExitCode.OK


# -- status: what the queen cannot tell ----------------------------------------------------------------


async def probe_unseen(ctx: KeeperContext, status: FleetStatus) -> dict[str, HostProbe]:
    """Probe over SSH, all at once, the inventory's remote hosts the queen has no live hive of (never
    deployed, uninstalled, stopped, unreachable); each probe is bounded by the host's connect timeout."""
    live = {h.hive_id for h in status.hives if h.live}
    aliases = [a for a, decl in ctx.inventory.hives.items() if not decl.embedded and a not in live]
    if not aliases:
        return {}
    queen = QueenService(ctx)
    try:
        hosts = HostService(queen)
        probes = await asyncio.gather(*(hosts.probe(a) for a in aliases))
    finally:
        await queen.close()
    return {p.alias: p for p in probes}


# -- down --fleet ------------------------------------------------------------------------------------


async def down_fleet(args: argparse.Namespace, ctx: KeeperContext) -> int:
    """Stop every remote hive of the inventory with its workers (over SSH, at once), then the local queen."""
    queen = QueenService(ctx)
    try:
        hosts = host_service(args, queen)
        try:
            specs = hosts.specs(None)
        except InventoryError as exc:
            err.print(f"[red]inventory error:[/] {escape(str(exc))}")
            return ExitCode.USAGE
        view = DeployView(err, [*(s.alias for s in specs), "queen"], quiet=args.json)
        try:
            run = hosts.run_context(update=view.update)
        except WheelhouseError as exc:
            raise OperationFailed(str(exc)) from None
        results = [HostResult(s.alias) for s in specs] + [HostResult("queen")]
        with view:
            await hosts.stop_fleet(specs, run, args.parallel, results)
    finally:
        await queen.close()
    if args.json:
        print(json.dumps({"ok": all(r.ok for r in results), "hosts": [r.to_json() for r in results]}, indent=2))
    else:
        out.print(results_table(results, "down --fleet"))
        err.print(summary(results))
    return ExitCode.OK if all(r.ok for r in results) else ExitCode.FAILED
