"""``rbee-keeper audit``: the audit log of this keeper's ``$RBEE_HOME``, as a table or JSON lines."""

from __future__ import annotations

import argparse
import json

from rich.markup import escape
from rich.table import Table

from rbee_fleet.contracts.vocabulary import ExitCode
from rbee_fleet.keeper.audit import AuditEntry, parse_since
from rbee_fleet.keeper.cli.console import err, out
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.fleet_change import audit_log

RESULT_STYLE = {"ok": "green", "failed": "red", "cancelled": "magenta"}


def audit_table(entries: list[AuditEntry]) -> Table:
    table = Table(title="audit log", title_justify="left")
    for col in ("when (UTC)", "who", "action", "targets", "result", "reason"):
        table.add_column(col, overflow="fold")
    for e in entries:
        result = e.result + (f" ({e.exit_code})" if e.exit_code is not None else "")
        table.add_row(escape(e.ts.replace("T", " ").removesuffix("Z")), escape(e.who), escape(e.action),
                      escape(", ".join(e.targets)), f"[{RESULT_STYLE.get(e.result, 'white')}]{escape(result)}[/]",
                      escape(e.reason))
    return table


async def audit(args: argparse.Namespace, ctx: KeeperContext) -> int:
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        return ExitCode.USAGE
    log = audit_log(ctx)
    entries = log.read(since, args.last)
    if args.json:
        for e in entries:
            print(json.dumps(e.to_json(), ensure_ascii=False))
        return ExitCode.OK
    if not entries:
        err.print(f"no audit entries{' since ' + args.since if args.since else ''} in {log.path}")
        return ExitCode.OK
    out.print(audit_table(entries))
    return ExitCode.OK


