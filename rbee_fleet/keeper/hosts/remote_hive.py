"""One installed hive over its transport (SSH, or local processes): start, stop, restart, uninstall, its status, its log.

Each raises ``DeployError`` with the host and the cause; ``HostService`` calls these for both front ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rbee_fleet.contracts.vocabulary import HiveAction
from rbee_fleet.deploy import steps
from rbee_fleet.deploy.errors import CommandFailed, DeployError
from rbee_fleet.deploy.facts import HostFacts
from rbee_fleet.deploy.plan import HostSpec
from rbee_fleet.deploy.runner import RunContext, open_host
from rbee_fleet.deploy.targets import SSHTarget


@dataclass(frozen=True)
class HiveOutcome:
    alias: str
    changed: bool
    message: str


class HiveNotInstalled(DeployError):
    kind = "not-installed"


def not_installed(spec: HostSpec, facts: HostFacts) -> DeployError:
    return HiveNotInstalled(spec.alias, f"rbee-fleet is not installed under {facts.install_dir}; install it first "
                                   f"(rbee-keeper hive install {spec.alias}, or the TUI's host menu)")


async def control_hive(spec: HostSpec, run: RunContext, action: HiveAction | str) -> HiveOutcome:
    """Start, stop, restart or uninstall one remote hive; raises ``DeployError`` with the reason."""
    action = HiveAction(action)
    t, facts = await open_host(spec, run)
    try:
        if action is HiveAction.UNINSTALL:
            run.update(spec.alias, "stopping the hive and removing every file of ours")
            removed = await steps.uninstall(t, spec, facts)
            return HiveOutcome(spec.alias, removed, "uninstalled: no process, service or file of ours is left"
                               if removed else "nothing of ours was installed there")
        if not facts.versions:
            raise not_installed(spec, facts)
        if action in (HiveAction.STOP, HiveAction.RESTART):
            run.update(spec.alias, "stopping the hive")
            stopped = await steps.ctl(t, facts, "stop")
            if not stopped.ok:
                raise CommandFailed(spec.alias, f"stopping the hive failed: {stopped.tail(4) or 'no output'}")
        if action in (HiveAction.START, HiveAction.RESTART):
            run.update(spec.alias, "starting the hive")
            await steps.start(t, facts, restart=False)
            run.update(spec.alias, f"waiting for the hive to answer at {spec.url}")
            await steps.wait_hive(t, spec, facts, run.token)
        if action is HiveAction.STOP:
            return HiveOutcome(spec.alias, facts.hive_running,
                               "hive stopped" if facts.hive_running else "the hive was not running")
        if action is HiveAction.START:
            return HiveOutcome(spec.alias, not facts.hive_running,
                               "hive running" if not facts.hive_running else "hive already running")
        return HiveOutcome(spec.alias, True, "hive restarted")
    finally:
        await t.close()


async def hive_status(spec: HostSpec, run: RunContext) -> dict[str, Any]:
    """The host, what is installed, whether the hive runs and whether it answers (``answering``)."""
    t, facts = await open_host(spec, run)
    try:
        if not facts.versions:
            raise not_installed(spec, facts)
        answering = False
        if facts.hive_running:
            try:
                await steps.wait_hive(t, spec, facts, run.token, timeout=3)
                answering = True
            except DeployError:
                answering = False
        return {
            "host": spec.alias, "transport": "ssh" if isinstance(spec.target, SSHTarget) else "local",
            "ssh": spec.target.describe() if isinstance(spec.target, SSHTarget) else None, "url": spec.url, "facts": facts.summary(),
            "install_dir": facts.install_dir, "installed": (facts.marker or {}).get("release"),
            "current": facts.current, "versions": list(facts.versions),
            "supervision": (facts.marker or {}).get("mode"), "running_pid": facts.hive_pid, "answering": answering,
        }
    finally:
        await t.close()


async def stream_log(spec: HostSpec, run: RunContext, lines: int, follow: bool, on_line: Callable[[str], None]) -> int:
    """The hive's log, last ``lines`` lines, then (``follow``) new ones until cancelled; the exit status of
    ``tail`` (1 when there is no log yet)."""
    t, facts = await open_host(spec, run)
    try:
        return await steps.logs(t, facts, lines, follow, on_line)
    finally:
        await asyncio.shield(t.close())
