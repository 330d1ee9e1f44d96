"""The local fleet's commands: ``up``, ``down``, ``status``, ``demo`` and ``infer``.

Each returns an exit code; output goes to stdout, progress to stderr."""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from typing import Any

from rich.markup import escape

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.contracts.vocabulary import ExitCode
from rbee_fleet.keeper.chat import ChatStream, openai_client, openai_message
from rbee_fleet.keeper.cli import tables
from rbee_fleet.keeper.cli.console import emit_json, err, out
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.local_queen import requests_in_flight, start_queen, stop_queen
from rbee_fleet.keeper.queen_client import QueenClient, QueenUnreachable
from rbee_fleet.keeper.queen_service import ensure_workers

# -- the local fleet ---------------------------------------------------------------------------------


async def _bring_up(ctx: KeeperContext, client: QueenClient, *, foreground: bool, quiet: bool) -> tuple[bool, Any, list]:
    where = ctx.inventory_path or "the built-in localhost inventory"
    if not quiet:
        err.print(f"[bold]queen[/]: {ctx.queen_url} (inventory: {escape(where)})")
    started, proc = await start_queen(ctx, client, foreground=foreground)
    if not quiet:
        err.print(f"[bold]queen[/]: {'started' if started else 'already running'}")
    with tables.JobReporter(err, quiet=quiet) as reporter:
        results = await ensure_workers(ctx, client, reporter)
    return started, proc, results


async def up(args: argparse.Namespace, ctx: KeeperContext) -> int:
    async with ctx.client() as client:
        started, proc, results = await _bring_up(ctx, client, foreground=args.foreground, quiet=args.json)
        failed = [(wid, e) for wid, _, e in results if e]
        status = await _ready_status(client, [wid for wid, _, e in results if not e])
        if args.json:
            emit_json({"ok": not failed, "queen_started": started, "queen_url": ctx.queen_url,
                        "workers": [{"worker_id": w, "changed": (r or {}).get("changed"), "error": e} for w, r, e in results],
                        "status": status.model_dump(mode="json")})
        else:
            for wid, e in failed:
                err.print(f"[red]worker {wid} failed:[/] {escape(e)}")
            for table in tables.status_tables(status):
                out.print(table)
        if args.foreground and proc is not None:
            err.print("running in the foreground; Ctrl-C stops the fleet")
            await _wait_foreground(proc)
    return ExitCode.FAILED if failed else ExitCode.OK


async def _ready_status(client: QueenClient, worker_ids: list[str], timeout: float = 10.0) -> Any:
    """The fleet's status once the queen has each of these workers ready: the hive says a worker is ready
    before the worker's next heartbeat tells the queen (bounded by ``timeout``, then as it is)."""
    deadline = time.monotonic() + timeout
    while True:
        status = await client.status()
        if all(status.worker_ready(wid) for wid in worker_ids) or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.1)


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
    if args.fleet:
        from rbee_fleet.keeper.cli import fleet_ops  # SSH and deploys: only for --fleet

        return await fleet_ops.down_fleet(args, ctx)
    async with ctx.client() as client:
        in_flight = await requests_in_flight(client)
        if in_flight:
            err.print(f"waiting for {in_flight} request(s) in flight to finish "
                      f"(at most {ctx.inventory.queen.drain_timeout_s:g} s)")
        started = time.monotonic()
        stopped = await stop_queen(ctx, client)
    waited = in_flight if stopped and in_flight else 0
    if args.json:
        emit_json({"ok": True, "stopped": stopped, "waited_for_requests": waited,
                   "seconds": round(time.monotonic() - started, 1)})
    elif stopped:
        out.print(f"queen stopped (waited for {waited} request(s) in flight, {time.monotonic() - started:.1f} s)")
    else:
        out.print("queen was not running")
    return ExitCode.OK


async def status(args: argparse.Namespace, ctx: KeeperContext) -> int:
    async with ctx.client() as client:
        st = await client.status()
    probes = {}
    if not args.no_probe and any(not h.embedded for h in ctx.inventory.hives.values()):
        from rbee_fleet.keeper.cli import fleet_ops  # SSH: only for an inventory with installed hosts

        probes = await fleet_ops.probe_unseen(ctx, st)
    if args.json:
        emit_json({**st.model_dump(mode="json"),
                   "probed": {a: {"state": p.state, "reason": p.reason, "version": p.version} for a, p in probes.items()}})
    else:
        for table in tables.status_tables(st, probes):
            out.print(table)
    return ExitCode.OK


async def demo(args: argparse.Namespace, ctx: KeeperContext) -> int:
    err.rule("[bold]rbee-fleet demo[/]")
    async with ctx.client() as client:
        _, _, results = await _bring_up(ctx, client, foreground=False, quiet=False)
        failed = [(wid, e) for wid, _, e in results if e]
        if failed:
            for wid, e in failed:
                err.print(f"[red]worker {wid} failed:[/] {escape(e)}")
            return ExitCode.FAILED
        st = await client.status()
        if not st.models:
            err.print("[red]no model is served; check the inventory's workers[/]")
            return ExitCode.FAILED
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
        for table in tables.status_tables(await client.status()):
            out.print(table)
    err.print(f"\nThe fleet keeps running. OpenAI endpoint: [bold]{ctx.queen_url}/v1[/]  (model: {model})\n"
              f"Try: rbee-keeper infer -m {model} \"Hello\"   Stop it: rbee-keeper down")
    return ExitCode.OK


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
            emit_json(resp.model_dump())
        else:
            stats = await _stream_chat(oai, ctx.queen_url, args.model, messages, args.max_tokens, args.temperature, args.seed)
            err.print(f"[dim]{stats}[/]")
    finally:
        await oai.close()
    return ExitCode.OK
