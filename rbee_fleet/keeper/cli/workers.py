"""Commands on workers, models and jobs: each runs through the queen as a job (or reads its state)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable
from typing import Any

from rich.markup import escape

from rbee_fleet.common.options import parse_key_values
from rbee_fleet.contracts.fleet import WorkerSpawnOp
from rbee_fleet.contracts.vocabulary import ExitCode
from rbee_fleet.keeper.cli import tables
from rbee_fleet.keeper.cli.console import emit_json, err, fail, out
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.queen_service import QueenService


async def _job(args: argparse.Namespace, ctx: KeeperContext,
               action: Callable[[QueenService, tables.JobReporter], Awaitable[dict[str, Any]]]) -> int:
    fleet = QueenService(ctx)
    try:
        with tables.JobReporter(err, quiet=args.json) as reporter:
            result = await action(fleet, reporter)
    finally:
        await fleet.close()
    if args.json:
        emit_json({"ok": True, **result})
    return ExitCode.OK


async def worker_spawn(args: argparse.Namespace, ctx: KeeperContext) -> int:
    try:
        options = parse_key_values(args.option)
    except ValueError as exc:
        fail(args, str(exc))
        return ExitCode.USAGE
    op = WorkerSpawnOp(hive=args.hive or ctx.local_hive(), model=args.model, backend=args.backend, device=args.device,
                       placement=args.placement, worker_id=args.worker_id, ctx_size=args.ctx_size,
                       threads=args.threads, options=options, gpu_layers=args.gpu_layers)
    return await _job(args, ctx, lambda fleet, sink: fleet.spawn_worker(op, sink))


async def worker_list(args: argparse.Namespace, ctx: KeeperContext) -> int:
    async with ctx.client() as client:
        st = await client.status()
    if args.json:
        emit_json([w.model_dump(mode="json") for w in st.workers])
    else:
        out.print(tables.status_tables(st)[2])
    return ExitCode.OK


async def worker_stop(args: argparse.Namespace, ctx: KeeperContext) -> int:
    return await _job(args, ctx, lambda fleet, sink: fleet.stop_worker(args.worker_id, args.hive, sink))


async def model_list(args: argparse.Namespace, ctx: KeeperContext) -> int:
    if not args.hive:  # the fleet's models, each with its state (what /v1/models lists)
        async with ctx.client() as client:
            st = await client.status()
        if args.json:
            emit_json([m.model_dump(mode="json") for m in st.catalog])
        else:
            out.print(tables.fleet_models_table(st.catalog))
        return ExitCode.OK
    hive = args.hive
    async with ctx.client() as client:
        models = await client.models(hive)
    if args.json:
        emit_json([m.model_dump(mode="json") for m in models])
    else:
        out.print(tables.models_table(hive, models))
    return ExitCode.OK


async def model_download(args: argparse.Namespace, ctx: KeeperContext) -> int:
    return await _job(args, ctx, lambda fleet, sink: fleet.download_model(args.source, args.hive, args.name, sink))


async def model_delete(args: argparse.Namespace, ctx: KeeperContext) -> int:
    return await _job(args, ctx, lambda fleet, sink: fleet.delete_model(args.model, args.hive, sink))


async def jobs_list(args: argparse.Namespace, ctx: KeeperContext) -> int:
    async with ctx.client() as client:
        jobs = await client.job_list()
    if args.json:
        emit_json([j.model_dump(mode="json") for j in jobs])
        return ExitCode.OK
    from rich.table import Table

    table = Table(title="jobs", title_justify="left")
    for col in ("job", "operation", "state", "started", "error"):
        table.add_column(col)
    for j in jobs:
        table.add_row(*(escape(str(v)) for v in (j.job_id, j.operation.get("kind"), j.state.value,
                      time.strftime("%H:%M:%S", time.localtime(j.created_at)), j.error or "")))
    out.print(table)
    return ExitCode.OK


async def jobs_watch(args: argparse.Namespace, ctx: KeeperContext) -> int:
    async with ctx.client() as client:
        with tables.JobReporter(err) as reporter:
            last = None
            async for event in client.jobs.events(args.job_id):
                reporter(args.job_id, event)
                last = event
    return ExitCode.FAILED if last is not None and last.type in ("error", "cancelled") else ExitCode.OK


async def jobs_cancel(args: argparse.Namespace, ctx: KeeperContext) -> int:
    async with ctx.client() as client:
        await client.jobs.cancel(args.job_id)
    out.print(f"cancelled {args.job_id}")
    return ExitCode.OK
