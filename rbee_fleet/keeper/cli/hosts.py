"""The host commands: ``deploy`` (every host of the inventory) and ``hive ACTION ALIAS`` (one installed hive,
over SSH or locally)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rbee_fleet.common.inventory import InventoryError
from rbee_fleet.contracts.vocabulary import ExitCode, HiveAction
from rbee_fleet.deploy.errors import DeployError, WheelhouseError
from rbee_fleet.deploy.plan import HostSpec
from rbee_fleet.deploy.runner import SKIPPED, HostResult, RunContext
from rbee_fleet.keeper.cli import fleet_ops
from rbee_fleet.keeper.cli.console import err, fail, out
from rbee_fleet.keeper.cli.deploy_view import DeployView, results_table, summary
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.hosts.rollout import RolloutPolicy
from rbee_fleet.keeper.hosts.service import HostService
from rbee_fleet.keeper.queen_service import QueenService

# -- shared set-up ---------------------------------------------------------------------------------


def _run_context(args: argparse.Namespace, hosts: HostService, view: DeployView | None = None, *,
                 check: bool = False) -> RunContext:
    return hosts.run_context(update=view.update if view is not None else None, check=check,
                             source=Path(args.source) if getattr(args, "source", None) else None,
                             accept_new=getattr(args, "accept_new_host_keys", False))


def _emit(args: argparse.Namespace, results: list[HostResult], title: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"ok": all(r.ok for r in results), "halted": any(r.status == SKIPPED for r in results),
                          "hosts": [r.to_json() for r in results]}, indent=2))
        return
    out.print(results_table(results, title))
    err.print(summary(results))


async def _run_with_view(args: argparse.Namespace, specs: list[HostSpec], view: DeployView,
                         job: Callable[[list[HostResult]], Awaitable[Any]], title: str) -> int:
    results = [HostResult(s.alias) for s in specs]
    interrupted = False
    with view:
        try:
            await job(results)
        except (asyncio.CancelledError, KeyboardInterrupt):
            interrupted = True
    _emit(args, results, title)
    if interrupted:
        return ExitCode.INTERRUPTED
    if any(r.status == SKIPPED for r in results):
        return ExitCode.HALTED
    return ExitCode.OK if all(r.ok for r in results) else ExitCode.FAILED


# -- deploy ----------------------------------------------------------------------------------------


async def deploy_command(args: argparse.Namespace, ctx: KeeperContext) -> int:
    queen = QueenService(ctx)
    try:
        return await _deploy(args, fleet_ops.host_service(args, queen))
    finally:
        await queen.close()


async def _deploy(args: argparse.Namespace, hosts: HostService) -> int:
    ctx = hosts.ctx
    try:
        specs = hosts.specs(args.limit, embedded=True)
    except InventoryError as exc:
        err.print(f"[red]inventory error:[/] {exc}", highlight=False)
        return ExitCode.USAGE
    if not specs:
        err.print(f"[yellow]the inventory ({ctx.inventory_path or 'built in'}) declares no hives; nothing to deploy[/]")
        return ExitCode.OK
    try:
        policy = RolloutPolicy(args.batch, args.max_fail)
        policy.batch_size(len(specs))
        if args.max_fail is not None and args.max_fail < 1:
            raise ValueError(f"--max-fail {args.max_fail}: give 1 or more")
    except ValueError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        return ExitCode.USAGE
    view = DeployView(err, [s.alias for s in specs], quiet=args.json)
    try:
        run = _run_context(args, hosts, view, check=args.check)
    except WheelhouseError as exc:
        fail(args, str(exc))
        return ExitCode.FAILED
    if not args.check:
        await hosts.changes.wait_free(f"deploy {','.join(s.alias for s in specs)}")
    started = not args.check and await hosts.with_queen()
    if started:
        err.print(f"[bold]queen[/]: started at {ctx.queen_url}")
    return await _run_with_view(args, specs, view,
                                lambda results: hosts.deploy_specs(specs, run, args.parallel, results, policy=policy,
                                                                   queen_started=started),
                                "deploy --check" if args.check else "deploy")


# -- hive ACTION ALIAS -----------------------------------------------------------------------------


async def hive_command(args: argparse.Namespace, ctx: KeeperContext) -> int:
    """``rbee-keeper hive ACTION ALIAS``."""
    action = args.hive_command
    queen = QueenService(ctx)
    try:
        hosts = fleet_ops.host_service(args, queen)
        specs = hosts.specs(args.alias)
        if action in ("install", "upgrade"):
            return await _install(args, hosts, specs, upgrade=action == "upgrade")
        return await _on_host(args, hosts, specs[0], action)
    except InventoryError as exc:
        err.print(f"[red]inventory error:[/] {exc}", highlight=False)
        return ExitCode.USAGE
    except WheelhouseError as exc:
        fail(args, str(exc))
        return ExitCode.FAILED
    finally:
        await queen.close()


async def _install(args: argparse.Namespace, hosts: HostService, specs: list[HostSpec], upgrade: bool) -> int:
    view = DeployView(err, [s.alias for s in specs], quiet=args.json)
    run = _run_context(args, hosts, view)
    await hosts.changes.wait_free(f"hive {'upgrade' if upgrade else 'install'} {','.join(s.alias for s in specs)}")
    await hosts.with_queen()
    return await _run_with_view(args, specs, view,
                                lambda results: hosts.install(specs, run, upgrade=upgrade, results=results),
                                f"hive {'upgrade' if upgrade else 'install'}")


async def _on_host(args: argparse.Namespace, hosts: HostService, spec: HostSpec, action: str) -> int:
    run = _run_context(args, hosts)
    try:
        if action == "logs":
            try:
                code = await hosts.logs(spec, run, args.lines, args.follow, _print_line)
            except asyncio.CancelledError:
                return ExitCode.INTERRUPTED
            return ExitCode.OK if code == 0 else ExitCode.FAILED
        if action == "status":
            return _status(args, await hosts.status(spec, run))
        outcome = await hosts.control(spec, run, HiveAction(action))
    except DeployError as exc:
        return _fail(args, spec.alias, exc.reason)
    return _done(args, spec.alias, outcome.message, changed=outcome.changed)


def _status(args: argparse.Namespace, info: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            out.print(f"[bold]{key:>12}[/]: {value}", highlight=False)
    return ExitCode.OK if info["running_pid"] and info["answering"] else ExitCode.FAILED


def _print_line(line: str) -> None:
    """One log line, flushed at once: ``logs -f`` into a pipe must not wait for a full buffer."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _done(args: argparse.Namespace, alias: str, message: str, changed: bool) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"ok": True, "host": alias, "changed": changed, "message": message}))
    else:
        out.print(f"[bold]{alias}[/]: {message}", highlight=False)
    return ExitCode.OK


def _fail(args: argparse.Namespace, alias: str, reason: str) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "host": alias, "error": reason}))
    err.print(f"[red]error:[/] {alias}: {reason}", highlight=False)
    return ExitCode.FAILED
