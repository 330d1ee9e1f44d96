"""The keeper's command line, as argparse sees it: every command, its flags and its handler's name.

Nothing here imports what a command runs: a handler is named ``"module:function"`` (a module of
``keeper/cli``) and ``entry`` imports it only once the command line is parsed, so ``rbee-keeper status``
never loads the SSH, deploy or TUI code, and ``--help`` loads none of it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from rbee_fleet import __version__
from rbee_fleet.contracts.vocabulary import BACKEND_CHOICES, HIVE_COMMANDS, PLACEMENT_POLICIES

DESCRIPTION = """rbee-keeper (alias rbee): bring up, inspect and operate an rbee fleet.

With no command on a terminal, opens the TUI (same as `rbee-keeper tui`).

Exit codes: 0 success, 1 an operation failed, 2 bad usage or a bad inventory, 3 the queen is not running,
4 another operation holds the fleet lock, 5 a rollout stopped at --max-fail.
"""


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-i", "--inventory", default=argparse.SUPPRESS,
                        help="inventory TOML (default: $RBEE_INVENTORY, ./inventory/localhost.toml, or built in)")
    return common


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="rbee-keeper", description=DESCRIPTION, parents=[common],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name: str, help: str, handler: str, parent: Any = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=handler)
        return p

    p = cmd("up", "start the queen and the inventory's local workers, wait until ready", "local_fleet:up")
    p.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops the fleet")
    _json_flag(p)
    p = cmd("down", "stop the local queen and its workers (--fleet: every remote hive's too, first)", "local_fleet:down")
    p.add_argument("--fleet", action="store_true",
                   help="first stop every remote hive of the inventory and its workers over SSH, then the local queen")
    p.add_argument("--parallel", type=int, default=8, metavar="N", help="with --fleet: hosts at a time (default 8)")
    add_wait_flag(p)
    _json_flag(p)
    p = cmd("status", "show the queen, hives and workers", "local_fleet:status")
    p.add_argument("--no-probe", action="store_true",
                   help="do not ask remote hosts the queen has no live hive of over SSH (not installed, stopped, ...)")
    _json_flag(p)
    p = cmd("demo", "bring up the local fleet, stream one chat answer, show the fleet", "local_fleet:demo")
    p.add_argument("--prompt", default="In two sentences, what is a bee hive?")
    p.add_argument("--max-tokens", type=int, default=80)

    p = cmd("infer", "send one prompt through the queen and stream the answer", "local_fleet:infer")
    p.add_argument("prompt")
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--system", help="a system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int)
    _json_flag(p)

    worker = sub.add_parser("worker", help="spawn, list and stop workers", parents=[common])
    wsub = worker.add_subparsers(dest="worker_command", metavar="ACTION", required=True)
    p = cmd("spawn", "start a worker for a model on a hive", "workers:worker_spawn", wsub)
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
    p = cmd("list", "list workers known to the queen", "workers:worker_list", wsub)
    _json_flag(p)
    p = cmd("stop", "stop a worker", "workers:worker_stop", wsub)
    p.add_argument("worker_id")
    p.add_argument("--hive", help="hive alias (default: the worker's own hive)")
    _json_flag(p)

    model = sub.add_parser("model", help="list, download and delete models on a hive", parents=[common])
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    p = cmd("list", "list the fleet's models and their state (loaded, loading, available), or one hive's catalog",
            "workers:model_list", msub)
    p.add_argument("--hive", help="show this hive's catalog (files, sources) instead")
    _json_flag(p)
    p = cmd("download", "fetch a model into a hive's catalog", "workers:model_download", msub)
    p.add_argument("source", help="alias (smollm2), local path, http(s) URL, or hf:OWNER/REPO[/FILE][@REVISION]")
    p.add_argument("--name", help="name in the catalog (default: from the source)")
    p.add_argument("--hive")
    _json_flag(p)
    p = cmd("delete", "delete a model from a hive's catalog", "workers:model_delete", msub)
    p.add_argument("model")
    p.add_argument("--hive")
    _json_flag(p)

    p = sub.add_parser("tui", help="open the terminal UI (the default with no command)",
                       description="open the terminal UI: the fleet live, every operation at a keystroke",
                       parents=[common])
    p.add_argument("--refresh", type=float, default=1.0, metavar="SECONDS", help="how often to poll the queen")

    jobs = sub.add_parser("jobs", help="list, follow and cancel jobs", parents=[common])
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    p = cmd("list", "list recent jobs", "workers:jobs_list", jsub)
    _json_flag(p)
    p = cmd("watch", "follow a job's events", "workers:jobs_watch", jsub)
    p.add_argument("job_id")
    p = cmd("cancel", "cancel a running job", "workers:jobs_cancel", jsub)
    p.add_argument("job_id")

    _host_parsers(sub, common, cmd)
    _lock_parsers(sub, common, cmd)
    _audit_parser(cmd)
    _rollback_parser(cmd)
    return parser



def add_wait_flag(p: argparse.ArgumentParser) -> None:
    """``--wait-lock SECONDS`` on a command that changes the fleet."""
    p.add_argument("--wait-lock", type=float, default=0.0, metavar="SECONDS",
                   help="when another operation holds the fleet lock, wait up to this long for it (default: refuse at once)")


def _forget_key_parser(hsub: Any, cmd: Callable[..., argparse.ArgumentParser]) -> None:
    p = cmd("forget-key", "remove the host's key from the keeper's own known_hosts (after a reinstall)", "fleet_ops:forget_key", hsub)
    p.add_argument("alias", help="the hive's alias in the inventory")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def _host_parsers(sub: Any, common: argparse.ArgumentParser, cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``deploy`` and ``hive`` on the keeper's subcommand parser."""
    p = cmd("deploy", "bring every host of the inventory to its declared state: the local queen with its embedded "
                      "hive, installed hives (over SSH or locally), then each host's workers",
            "hosts:deploy_command")
    _deploy_flags(p)
    p.add_argument("--check", action="store_true", help="show what would change on each host; change nothing")
    p.add_argument("--limit", metavar="A,B", help="only these hive aliases")
    p.add_argument("--parallel", type=int, default=8, metavar="N", help="hosts at a time (default 8)")
    _rollout_flags(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    add_wait_flag(p)

    hive = sub.add_parser("hive", help="manage one installed hive (over SSH, or locally)", parents=[common],
                          description="Manage the hive of one installed host of the inventory, over SSH or, "
                                      "for a hive with transport = \"local\", on this machine.")
    hsub = hive.add_subparsers(dest="hive_command", metavar="ACTION", required=True)
    for action, help in HIVE_COMMANDS.items():
        p = cmd(action, help, "hosts:hive_command", hsub)
        p.add_argument("alias", help="the hive's alias in the inventory")
        if action in ("install", "upgrade"):
            _deploy_flags(p)
        else:
            p.add_argument("--accept-new-host-keys", action="store_true",
                           help="trust and record the key of a host seen for the first time")
        if action == "logs":
            p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C stops)")
            p.add_argument("-n", "--lines", type=int, default=100, help="lines to show first (default 100)")
        if action in ("install", "upgrade", "status", "start", "stop", "restart", "uninstall"):
            p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
        if action in ("install", "upgrade", "start", "stop", "restart", "uninstall"):
            add_wait_flag(p)
    _forget_key_parser(hsub, cmd)


def _rollout_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", metavar="N|P%",
                   help="deploy hosts in batches of N hosts (or P%% of them), each batch health-gated (default: all at once)")
    p.add_argument("--max-fail", type=int, metavar="N",
                   help="stop the rollout once N hosts have failed; hosts not yet reached are skipped (default: never stop)")


def _deploy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--accept-new-host-keys", action="store_true",
                   help="trust and record the key of a host seen for the first time (a changed key is always refused)")
    p.add_argument("--source", metavar="DIR", help="ship rbee-fleet from this checkout (default: the keeper's own)")


def _lock_parsers(sub: Any, common: argparse.ArgumentParser, cmd: Callable[..., argparse.ArgumentParser]) -> None:
    lock = sub.add_parser("lock", help="show or release the fleet lock of the inventory", parents=[common],
                          description="The fleet lock keeps two operations that change the same inventory's fleet "
                                      "(deploy, hive install/upgrade/start/stop/restart/uninstall, down --fleet) apart.")
    lsub = lock.add_subparsers(dest="lock_command", metavar="ACTION", required=True)
    p = cmd("status", "show who holds the fleet lock (exit 0 when free, 1 when held)", "lock:lock_status", lsub)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p = cmd("release", "remove the fleet lock of a holder that is gone (a live one only with --force)",
            "lock:lock_release", lsub)
    p.add_argument("--force", action="store_true", help="remove it even though its holder may still run")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def _audit_parser(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    p = cmd("audit", "show the audit log: who changed the fleet, when, what, on which hosts, with what result", "audit:audit")
    p.add_argument("--since", metavar="DURATION_OR_TIME",
                   help="only entries since then: a duration back from now (30m, 2h, 1d) or a UTC time (2026-11-30T22:00)")
    p.add_argument("-n", "--last", type=int, metavar="N", help="only the last N entries")
    p.add_argument("--json", action="store_true", help="print the entries as JSON lines on stdout (as they are stored)")


def _rollback_parser(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    p = cmd("rollback", "switch remote hosts back to their previous installed version (no reinstall), "
                        "bring their workers back and health-gate them", "rollback:rollback_command")
    p.add_argument("--limit", metavar="A,B", help="only these hive aliases (default: every remote hive)")
    p.add_argument("--parallel", type=int, default=8, metavar="N", help="hosts at a time (default 8)")
    p.add_argument("--accept-new-host-keys", action="store_true",
                   help="trust and record the key of a host seen for the first time")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    add_wait_flag(p)


