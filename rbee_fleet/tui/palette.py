"""The command palette (ctrl+p): every action of the TUI, for every host and worker, searchable."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING

from textual.app import SystemCommand

from rbee_fleet.contracts.vocabulary import HiveAction

if TYPE_CHECKING:
    from rbee_fleet.tui.app import KeeperApp


def keeper_commands(app: KeeperApp) -> Iterable[SystemCommand]:
    """General commands show with an empty search; per-host and per-worker ones when searched for."""
    for mode, title in (("fleet", "Fleet"), ("jobs", "Jobs and logs"), ("chat", "Chat"), ("inventory", "Inventory")):
        yield SystemCommand(f"Go to: {title}", f"show the {title} screen", partial(app.switch_mode, mode))
    yield SystemCommand("Help", "every key binding", app.action_help)
    yield SystemCommand("Reload inventory", "read the inventory file again", app.action_reload_inventory)
    yield SystemCommand("Deploy all hosts", "check every host, show the plan, then deploy", app.deploy)
    if app.fleet is None:
        return
    inventory = app.fleet.ctx.inventory
    found = inventory.embedded_hive()
    if found:
        yield SystemCommand("Start the local fleet", f"start the queen and the workers of {found[0]}",
                            partial(app.hive_action, found[0], HiveAction.START))
        yield SystemCommand("Stop the local fleet", "stop the queen and its workers",
                            partial(app.hive_action, found[0], HiveAction.STOP))
    for alias in inventory.hives:
        yield SystemCommand(f"Open host {alias}", "devices, workers, models, operations",
                            partial(app.open_host, alias), discover=False)
        yield SystemCommand(f"Spawn a worker on {alias}", "start a worker for a model",
                            partial(app.spawn_worker, alias), discover=False)
        yield SystemCommand(f"Download a model to {alias}", "fetch a model into the host's catalog",
                            partial(app.download_model, alias), discover=False)
        yield SystemCommand(f"Delete a model from {alias}", "remove a model from the host's catalog",
                            partial(app.delete_model, None, alias), discover=False)
        yield SystemCommand(f"Deploy {alias}", "check, show the plan, deploy", partial(app.deploy, [alias]),
                            discover=False)
        for action in HiveAction:
            yield SystemCommand(f"{action.value.capitalize()} the hive on {alias}", f"hive {action.value}",
                                partial(app.hive_action, alias, action), discover=False)
        yield SystemCommand(f"Check the host key of {alias}", "show its fingerprint, trust it if you agree",
                            partial(app.check_host_key, alias), discover=False)
        yield SystemCommand(f"Follow the log of {alias}", "the hive's log, live",
                            partial(app.follow_host_log, alias), discover=False)
        yield SystemCommand(f"ssh into {alias}", "an interactive shell; the TUI resumes after it",
                            partial(app.ssh, alias), discover=False)
    for row in app.snapshot.rows:
        for w in row.workers:
            if w.state not in ("not running", "stopped"):
                yield SystemCommand(f"Stop worker {w.worker_id}", f"on {row.alias}",
                                    partial(app.stop_worker, w.worker_id, row.alias), discover=False)
    for op in app.operations.running():
        if op.worker is not None:
            yield SystemCommand(f"Cancel: {op.label}", "stop this running operation", op.worker.cancel,
                                discover=False)
