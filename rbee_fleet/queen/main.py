"""queen-rbee: serve the OpenAI API for the fleet, keep its registry, schedule every request."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rbee_fleet import __version__
from rbee_fleet.common.http import run_daemon, serve
from rbee_fleet.common.inventory import InventoryError, default_inventory, load_inventory
from rbee_fleet.common.logs import set_process_title, setup_logging
from rbee_fleet.common.paths import Layout
from rbee_fleet.queen.app import create_app
from rbee_fleet.queen.drain import DRAIN
from rbee_fleet.queen.settings import InsecureBind, settings_from_inventory

log = logging.getLogger("rbee_fleet.queen")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="queen-rbee", description=__doc__)
    p.add_argument("-i", "--inventory", help="inventory TOML (default: the built-in localhost fleet)")
    p.add_argument("--host", help="address to bind (overrides [queen].host; default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (overrides [queen].port; default 8500)")
    p.add_argument("--home", help="state directory (default: $RBEE_HOME or ~/.local/share/rbee-fleet)")
    p.add_argument("--drain-timeout", type=float, metavar="SECONDS",
                   help="on SIGTERM, how long answers in flight may run on (overrides [queen].drain_timeout_s; default 60)")
    p.add_argument("--no-reconcile", action="store_true", help="do not start the inventory's local workers")
    p.add_argument("--log-level", default=None)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging("queen", args.log_level)
    # ps and pkill see "queen-rbee --home HOME ..."; the keeper's pidfile check matches on that.
    set_process_title(" ".join(["queen-rbee", *(sys.argv[1:] if argv is None else argv)]))
    try:
        inv = load_inventory(args.inventory) if args.inventory else default_inventory()
        layout = Layout(Path(args.home)) if args.home else Layout.default()
        settings = settings_from_inventory(inv, layout, host=args.host, port=args.port,
                                           drain_timeout_s=args.drain_timeout)
        app = create_app(settings, reconcile=not args.no_reconcile)
    except (InventoryError, InsecureBind, OSError, ValueError) as exc:
        sys.exit(f"queen-rbee: {exc}")

    def ready() -> None:
        log.info("queen listening on %s:%d (advertised as %s)", settings.config.host, settings.config.port, settings.url)

    run_daemon(serve(app, settings.config.host, settings.config.port, on_ready=ready, before_shutdown=app[DRAIN].run,
                     limits=settings.client_limits))


if __name__ == "__main__":
    main()
