"""The keeper's commands. Each returns an exit code; output goes to stdout, progress to stderr."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from rich.console import Console
from rich.markup import escape

from rbee_fleet.common.errors import ApiError, OperationFailed
from rbee_fleet.common.inventory import InventoryError
from rbee_fleet.common.options import parse_key_values
from rbee_fleet.contracts.fleet import WorkerSpawnOp
from rbee_fleet.keeper import render
from rbee_fleet.keeper.chat import ChatStream, openai_client, openai_message
from rbee_fleet.keeper.fleet_service import FleetService
from rbee_fleet.keeper.queen_client import QueenClient, QueenUnreachable
from rbee_fleet.keeper.services import KeeperContext, ensure_workers, start_queen, stop_queen


def _console(stderr: bool) -> Console:
    probe = Console(stderr=stderr)
    # Logs and pipes get wide lines instead of rich's 80-column default.
    return Console(stderr=stderr, highlight=False, width=None if probe.is_terminal else 160)


out = _console(stderr=False)
err = _console(stderr=True)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_QUEEN = 0, 1, 2, 3


async def run(args: argparse.Namespace) -> int:
    try:
        ctx = KeeperContext.load(getattr(args, "inventory", None))
    except InventoryError as exc:
        err.print(f"[red]inventory error:[/] {escape(str(exc))}", soft_wrap=True)
        return EXIT_USAGE
    try:
        return await args.func(args, ctx)
    except QueenUnreachable as exc:
        _fail(args, str(exc))
        return EXIT_NO_QUEEN
    except (OperationFailed, ApiError) as exc:
        _fail(args, str(exc))
        return EXIT_FAILED


def _fail(args: argparse.Namespace, message: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": message}))
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)


def _emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# -- the local fleet ---------------------------------------------------------------------------------


async def _bring_up(ctx: KeeperContext, client: QueenClient, *, foreground: bool, quiet: bool) -> tuple[bool, Any, list]:
    where = ctx.inventory_path or "the built-in localhost inventory"
    if not quiet:
        err.print(f"[bold]queen[/]: {ctx.queen_url} (inventory: {escape(where)})")
    started, proc = await start_queen(ctx, client, foreground=foreground)
    if not quiet:
        err.print(f"[bold]queen[/]: {'started' if started else 'already running'}")
    with render.JobReporter(err, quiet=quiet) as reporter:
        results = await ensure_workers(ctx, client, reporter)
    return started, proc, results


async def up(args: argparse.Namespace, ctx: KeeperContext) -> int:
    async with ctx.client() as client:
        started, proc, results = await _bring_up(ctx, client, foreground=args.foreground, quiet=args.json)
        failed = [(wid, e) for wid, _, e in results if e]
        status = await client.status()
        if args.json:
            _emit_json({"ok": not failed, "queen_started": started, "queen_url": ctx.queen_url,
                        "workers": [{"worker_id": w, "changed": (r or {}).get("changed"), "error": e} for w, r, e in results],
                        "status": status.model_dump(mode="json")})
        else:
            for wid, e in failed:
                err.print(f"[red]worker {wid} failed:[/] {escape(e)}")
            for table in render.status_tables(status):
                out.print(table)
        if args.foreground and proc is not None:
            err.print("running in the foreground; Ctrl-C stops the fleet")
            await _wait_foreground(proc)
    return EXIT_FAILED if failed else EXIT_OK


async def _wait_foreground(proc: Any) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(asyncio.to_thread(proc.wait))
    await asyncio.wait({waiter, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    await waiter


async def down(args: argparse.Namespace, ctx: KeeperContext) -> int:
    async with ctx.client() as client:
        stopped = await stop_queen(ctx, client)
    if args.json:
        _emit_json({"ok": True, "stopped": stopped})
    else:
        out.print("queen stopped" if stopped else "queen was not running")
    return EXIT_OK


async def status(args: argparse.Namespace, ctx: KeeperContext) -> int:
    async with ctx.client() as client:
        st = await client.status()
    if args.json:
        _emit_json(st.model_dump(mode="json"))
    else:
        for table in render.status_tables(st):
            out.print(table)
    return EXIT_OK


async def demo(args: argparse.Namespace, ctx: KeeperContext) -> int:
    err.rule("[bold]rbee-fleet demo[/]")
    async with ctx.client() as client:
        _, _, results = await _bring_up(ctx, client, foreground=False, quiet=False)
        failed = [(wid, e) for wid, _, e in results if e]
        if failed:
            for wid, e in failed:
                err.print(f"[red]worker {wid} failed:[/] {escape(e)}")
            return EXIT_FAILED
        st = await client.status()
        if not st.models:
            err.print("[red]no model is served; check the inventory's workers[/]")
            return EXIT_FAILED
        model = st.models[0]
        err.rule(f"[bold]streaming a chat completion from {model} with the openai client[/]")
        err.print(f"[dim]> {escape(args.prompt)}[/]")
        oai = openai_client(ctx.queen_url, ctx.api_key)
        try:
            stats = await _stream_chat(oai, ctx.queen_url, model, [{"role": "user", "content": args.prompt}],
                                       args.max_tokens, 0.7, None)
        finally:
            await oai.close()
        err.print(f"[dim]{stats}[/]")
        err.rule("[bold]the fleet[/]")
        for table in render.status_tables(await client.status()):
            out.print(table)
    err.print(f"\nThe fleet keeps running. OpenAI endpoint: [bold]{ctx.queen_url}/v1[/]  (model: {model})\n"
              f"Try: rbee-keeper infer -m {model} \"Hello\"   Stop it: rbee-keeper down")
    return EXIT_OK


# -- inference ---------------------------------------------------------------------------------------


async def _stream_chat(oai: Any, queen_url: str, model: str, messages: list[dict[str, str]], max_tokens: int,
                       temperature: float, seed: int | None) -> str:
    stream = ChatStream(oai, queen_url, model, messages, max_tokens=max_tokens, temperature=temperature, seed=seed)
    async for piece in stream:
        out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
    out.print()
    assert stream.stats is not None
    return stream.stats.summary()


async def infer(args: argparse.Namespace, ctx: KeeperContext) -> int:
    import openai

    oai = openai_client(ctx.queen_url, ctx.api_key)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    try:
        if args.json:
            try:
                resp = await oai.chat.completions.create(model=args.model, messages=messages, max_tokens=args.max_tokens,
                                                         temperature=args.temperature, seed=args.seed)
            except openai.APIConnectionError:
                raise QueenUnreachable(ctx.queen_url, "connection refused") from None
            except openai.APIError as exc:
                raise OperationFailed(openai_message(exc)) from None
            _emit_json(resp.model_dump())
        else:
            stats = await _stream_chat(oai, ctx.queen_url, args.model, messages, args.max_tokens, args.temperature, args.seed)
            err.print(f"[dim]{stats}[/]")
    finally:
        await oai.close()
    return EXIT_OK


# -- workers, models, jobs ---------------------------------------------------------------------------


async def _job(args: argparse.Namespace, ctx: KeeperContext,
               action: Callable[[FleetService, render.JobReporter], Awaitable[dict[str, Any]]]) -> int:
    fleet = FleetService(ctx)
    try:
        with render.JobReporter(err, quiet=args.json) as reporter:
            result = await action(fleet, reporter)
    finally:
        await fleet.close()
    if args.json:
        _emit_json({"ok": True, **result})
    return EXIT_OK


async def worker_spawn(args: argparse.Namespace, ctx: KeeperContext) -> int:
    try:
        options = parse_key_values(args.option)
    except ValueError as exc:
        _fail(args, str(exc))
        return EXIT_USAGE
    op = WorkerSpawnOp(hive=args.hive or ctx.local_hive(), model=args.model, backend=args.backend, device=args.device,
                       placement=args.placement, worker_id=args.worker_id, ctx_size=args.ctx_size,
                       threads=args.threads, options=options)
    return await _job(args, ctx, lambda fleet, sink: fleet.spawn_worker(op, sink))


async def worker_list(args: argparse.Namespace, ctx: KeeperContext) -> int:
    async with ctx.client() as client:
        st = await client.status()
    if args.json:
        _emit_json([w.model_dump(mode="json") for w in st.workers])
    else:
        out.print(render.status_tables(st)[2])
    return EXIT_OK


async def worker_stop(args: argparse.Namespace, ctx: KeeperContext) -> int:
    return await _job(args, ctx, lambda fleet, sink: fleet.stop_worker(args.worker_id, args.hive, sink))


async def model_list(args: argparse.Namespace, ctx: KeeperContext) -> int:
    if not args.hive:  # the fleet's models, each with its state (what /v1/models lists)
        async with ctx.client() as client:
            st = await client.status()
        if args.json:
            _emit_json([m.model_dump(mode="json") for m in st.catalog])
        else:
            out.print(render.fleet_models_table(st.catalog))
        return EXIT_OK
    hive = args.hive
    async with ctx.client() as client:
        models = await client.models(hive)
    if args.json:
        _emit_json([m.model_dump(mode="json") for m in models])
    else:
        out.print(render.models_table(hive, models))
    return EXIT_OK


async def model_download(args: argparse.Namespace, ctx: KeeperContext) -> int:
    return await _job(args, ctx, lambda fleet, sink: fleet.download_model(args.source, args.hive, args.name, sink))


async def model_delete(args: argparse.Namespace, ctx: KeeperContext) -> int:
    return await _job(args, ctx, lambda fleet, sink: fleet.delete_model(args.model, args.hive, sink))


async def jobs_list(args: argparse.Namespace, ctx: KeeperContext) -> int:
    async with ctx.client() as client:
        jobs = await client.job_list()
    if args.json:
        _emit_json([j.model_dump(mode="json") for j in jobs])
        return EXIT_OK
    from rich.table import Table

    table = Table(title="jobs", title_justify="left")
    for col in ("job", "operation", "state", "started", "error"):
        table.add_column(col)
    for j in jobs:
        table.add_row(*(escape(str(v)) for v in (j.job_id, j.operation.get("kind"), j.state.value,
                      time.strftime("%H:%M:%S", time.localtime(j.created_at)), j.error or "")))
    out.print(table)
    return EXIT_OK


async def jobs_watch(args: argparse.Namespace, ctx: KeeperContext) -> int:
    async with ctx.client() as client:
        with render.JobReporter(err) as reporter:
            last = None
            async for event in client.jobs.events(args.job_id):
                reporter(args.job_id, event)
                last = event
    return EXIT_FAILED if last is not None and last.type in ("error", "cancelled") else EXIT_OK


async def jobs_cancel(args: argparse.Namespace, ctx: KeeperContext) -> int:
    async with ctx.client() as client:
        await client.jobs.cancel(args.job_id)
    out.print(f"cancelled {args.job_id}")
    return EXIT_OK
