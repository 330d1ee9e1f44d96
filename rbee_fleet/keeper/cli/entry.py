"""rbee-keeper (alias rbee): bring up, inspect and operate an rbee fleet.

With no command on a terminal, opens the TUI (same as `rbee-keeper tui`).

Exit codes: 0 success, 1 an operation failed, 2 bad usage or a bad inventory, 3 the queen is not running,
4 another operation holds the fleet lock, 5 a rollout stopped at --max-fail.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable

from rich.markup import escape

from rbee_fleet import __version__
from rbee_fleet.common.errors import ApiError, OperationFailed
from rbee_fleet.common.inventory import InventoryError
from rbee_fleet.contracts.vocabulary import BACKEND_CHOICES, PLACEMENT_POLICIES, ExitCode
from rbee_fleet.keeper.cli import audit, fleet_ops, hosts, local_fleet, lock, rollback, workers
from rbee_fleet.keeper.cli.console import err, fail
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.deploy_lock import FleetLocked
from rbee_fleet.keeper.queen_client import QueenUnreachable


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-i", "--inventory", default=argparse.SUPPRESS,
                        help="inventory TOML (default: $RBEE_INVENTORY, ./inventory/localhost.toml, or built in)")
    return common


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="rbee-keeper", description=__doc__, parents=[common],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name: str, help: str, fn: Callable[[argparse.Namespace], Awaitable[int]], parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=fn)
        return p

    p = cmd("up", "start the queen and the inventory's local workers, wait until ready", local_fleet.up)
    p.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops the fleet")
    _json_flag(p)
    p = cmd("down", "stop the local queen and its workers (--fleet: every remote hive's too, first)", local_fleet.down)
    p.add_argument("--fleet", action="store_true",
                   help="first stop every remote hive of the inventory and its workers over SSH, then the local queen")
    p.add_argument("--parallel", type=int, default=8, metavar="N", help="with --fleet: hosts at a time (default 8)")
    fleet_ops.add_wait_flag(p)
    _json_flag(p)
    p = cmd("status", "show the queen, hives and workers", local_fleet.status)
    p.add_argument("--no-probe", action="store_true",
                   help="do not ask remote hosts the queen has no live hive of over SSH (not installed, stopped, ...)")
    _json_flag(p)
    p = cmd("demo", "bring up the local fleet, stream one chat answer, show the fleet", local_fleet.demo)
    p.add_argument("--prompt", default="In two sentences, what is a bee hive?")
    p.add_argument("--max-tokens", type=int, default=80)

    p = cmd("infer", "send one prompt through the queen and stream the answer", local_fleet.infer)
    p.add_argument("prompt")
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--system", help="a system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int)
    _json_flag(p)

    worker = sub.add_parser("worker", help="spawn, list and stop workers", parents=[common])
    wsub = worker.add_subparsers(dest="worker_command", metavar="ACTION", required=True)
    p = cmd("spawn", "start a worker for a model on a hive", workers.worker_spawn, wsub)
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--hive", help="hive alias, or auto: the queen picks a hive by free VRAM, preferring those "
                                  "that have the model (default: the local hive)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    p.add_argument("--device", default="cpu",
                   help="cpu; a GPU: cuda:N[,M], vulkan:N, rocm:N, metal; or auto (the hive picks the GPU with the "
                        "most free memory that fits the model, else partial offload, else the CPU)")
    p.add_argument("--gpu-layers", type=int, help="GGUF on a GPU: layers to offload (default: every layer that fits)")
    p.add_argument("--placement", choices=PLACEMENT_POLICIES, default="binpack",
                   help="with --device auto: fill the tightest GPU (binpack) or the emptiest (spread)")
    p.add_argument("--id", dest="worker_id", help="worker id (default: HIVE-MODEL-N)")
    p.add_argument("--ctx-size", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, repeatable (exllamav2: cache=q4, gpu_split=[20,24], max_batch_size=8, ...)")
    _json_flag(p)
    p = cmd("list", "list workers known to the queen", workers.worker_list, wsub)
    _json_flag(p)
    p = cmd("stop", "stop a worker", workers.worker_stop, wsub)
    p.add_argument("worker_id")
    p.add_argument("--hive", help="hive alias (default: the worker's own hive)")
    _json_flag(p)

    model = sub.add_parser("model", help="list, download and delete models on a hive", parents=[common])
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    p = cmd("list", "list the fleet's models and their state (loaded, loading, available), or one hive's catalog",
            workers.model_list, msub)
    p.add_argument("--hive", help="show this hive's catalog (files, sources) instead")
    _json_flag(p)
    p = cmd("download", "fetch a model into a hive's catalog", workers.model_download, msub)
    p.add_argument("source", help="alias (smollm2), local path, http(s) URL, or hf:OWNER/REPO[/FILE][@REVISION]")
    p.add_argument("--name", help="name in the catalog (default: from the source)")
    p.add_argument("--hive")
    _json_flag(p)
    p = cmd("delete", "delete a model from a hive's catalog", workers.model_delete, msub)
    p.add_argument("model")
    p.add_argument("--hive")
    _json_flag(p)

    p = sub.add_parser("tui", help="open the terminal UI (the default with no command)",
                       description="open the terminal UI: the fleet live, every operation at a keystroke",
                       parents=[common])
    p.add_argument("--refresh", type=float, default=1.0, metavar="SECONDS", help="how often to poll the queen")

    jobs = sub.add_parser("jobs", help="list, follow and cancel jobs", parents=[common])
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    p = cmd("list", "list recent jobs", workers.jobs_list, jsub)
    _json_flag(p)
    p = cmd("watch", "follow a job's events", workers.jobs_watch, jsub)
    p.add_argument("job_id")
    p = cmd("cancel", "cancel a running job", workers.jobs_cancel, jsub)
    p.add_argument("job_id")

    hosts.add_parsers(sub, common, cmd)
    lock.add_parsers(sub, common, cmd)
    audit.add_parser(cmd)
    rollback.add_parser(cmd)
    return parser


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
    try:
        ctx = KeeperContext.load(getattr(args, "inventory", None))
    except InventoryError as exc:
        err.print(f"[red]inventory error:[/] {escape(str(exc))}", soft_wrap=True)
        return ExitCode.USAGE
    try:
        return await args.func(args, ctx)
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
