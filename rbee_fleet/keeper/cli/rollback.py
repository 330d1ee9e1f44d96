"""``rbee-keeper rollback``: switch remote hosts back to the version they ran before, then health-gate them."""

from __future__ import annotations

import argparse
from typing import Any

from rbee_fleet.common.inventory import InventoryError
from rbee_fleet.contracts.vocabulary import ExitCode
from rbee_fleet.keeper.cli import fleet_ops
from rbee_fleet.keeper.cli.console import err
from rbee_fleet.keeper.cli.deploy_view import DeployView
from rbee_fleet.keeper.cli.hosts import _run_context, _run_with_view
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.hosts.service import HostService
from rbee_fleet.keeper.queen_service import QueenService


async def rollback_command(args: argparse.Namespace, ctx: KeeperContext) -> int:
    queen = QueenService(ctx)
    try:
        return await _rollback(args, fleet_ops.host_service(args, queen))
    finally:
        await queen.close()


async def _rollback(args: argparse.Namespace, hosts: HostService) -> int:
    try:
        specs = hosts.specs(args.limit)
    except InventoryError as exc:
        err.print(f"[red]inventory error:[/] {exc}", highlight=False)
        return ExitCode.USAGE
    if not specs:
        err.print("[yellow]the inventory declares no remote hives; nothing to roll back[/]")
        return ExitCode.OK
    view = DeployView(err, [s.alias for s in specs], quiet=args.json)
    run = _run_context(args, hosts, view)
    await hosts.changes.wait_free(f"rollback {','.join(s.alias for s in specs)}")
    await hosts.with_queen()

    def job(results: list[Any]) -> Any:
        return hosts.rollback(specs, run, args.parallel, results)

    return await _run_with_view(args, specs, view, job, "rollback")
