"""rbee-hive: run the worker supervisor, model catalog and device detection of this machine."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

from rbee_fleet import __version__
from rbee_fleet.common.http import run_daemon, serve
from rbee_fleet.common.logs import set_process_title, setup_logging
from rbee_fleet.common.net import refuse_open_bind
from rbee_fleet.common.paths import Layout
from rbee_fleet.common.secrets import read_secret
from rbee_fleet.hive.app import create_app, drain
from rbee_fleet.hive.service import HiveSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rbee-hive", description=__doc__)
    p.add_argument("--hive-id", default=socket.gethostname(), help="this hive's name in the fleet")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--advertise-host", help="address the queen uses to reach this hive and its workers")
    p.add_argument("--queen-url", help="the queen to report to")
    p.add_argument("--token-file", help="cluster token file (mode 0600)")
    p.add_argument("--home", help="state directory (default: $RBEE_HOME or ~/.local/share/rbee-fleet)")
    p.add_argument("--worker-port-base", type=int, default=9300)
    p.add_argument("--heartbeat-interval", type=float, default=5.0)
    p.add_argument("--log-level", default=None)
    p.add_argument("--check", action="store_true",
                   help="check the GPU stack (driver, torch CUDA build, exllamav2, flash-attn), print JSON with "
                        "the fix for each problem, and exit: 0 when GPU workers can run here, 1 when not")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p.parse_args(argv)


def check() -> int:
    from rbee_fleet.hive import gpu_stack

    report = gpu_stack.check()
    print(json.dumps(report.to_json(), indent=2))
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.check:
        sys.exit(check())
    setup_logging("hive", args.log_level)
    # ps and pkill see "rbee-hive --home INSTALL ..."; the control script and uninstall match on that.
    set_process_title(" ".join(["rbee-hive", *(sys.argv[1:] if argv is None else argv)]))
    layout = Layout(Path(args.home)) if args.home else Layout.default()
    try:
        token = read_secret(args.token_file) if args.token_file else None
    except (OSError, ValueError) as exc:
        sys.exit(f"rbee-hive: {exc}")
    refuse_open_bind("rbee-hive", args.host, token)
    advertise = args.advertise_host or (args.host if args.host not in ("0.0.0.0", "::") else socket.gethostname())
    settings = HiveSettings(
        hive_id=args.hive_id,
        layout=layout,
        bind_host=args.host,
        port=args.port,
        advertise_host=advertise,
        queen_url=args.queen_url,
        token=token,
        token_file=args.token_file,
        heartbeat_interval_s=args.heartbeat_interval,
        worker_port_base=args.worker_port_base,
    )
    run_daemon(serve(create_app(settings), args.host, args.port, before_shutdown=drain))


if __name__ == "__main__":
    main()
