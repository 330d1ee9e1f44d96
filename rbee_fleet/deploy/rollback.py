"""Switching a host back to its previous version: one switch of ``current`` and a restart, no install.

A deploy keeps the version a host ran before (``KEEP_VERSIONS``) and records it in ``marker.json`` as
``previous``; a rollback points ``current`` at it again (the same atomic rename as a deploy's switch),
restarts the hive, waits until it answers and records the swap, so a second rollback goes forward again.
"""

from __future__ import annotations

from rbee_fleet.deploy import steps
from rbee_fleet.deploy.errors import DeployError
from rbee_fleet.deploy.facts import HostFacts
from rbee_fleet.deploy.plan import HostSpec, RemoteFile, marker, marker_json
from rbee_fleet.deploy.runner import RunContext, open_host
from rbee_fleet.deploy.transport import Transport


def previous_version(facts: HostFacts) -> str | None:
    """The version a rollback goes to: the marker's ``previous`` while it is installed, else the only other
    complete version on the host."""
    recorded = (facts.marker or {}).get("previous")
    if recorded and recorded in facts.versions and recorded != facts.current:
        return recorded
    others = [v for v in facts.versions if v != facts.current]
    return others[0] if len(others) == 1 else None


async def switch_back(spec: HostSpec, run: RunContext, to: str | None = None,
                      drop_failed: bool = False) -> tuple[str, str | None]:
    """Switch ``spec``'s host to ``to`` (default: its previous version), restart its hive and wait until it
    answers; returns (the version now current, the one before). ``drop_failed`` (a rollout going back from a
    version that failed there) removes the version left, so that no later rollback returns to it.
    ``DeployError`` names the host and why."""
    t, facts = await open_host(spec, run)
    try:
        if not facts.versions:
            raise DeployError(spec.alias, f"rbee-fleet is not installed under {facts.install_dir}: nothing to roll back")
        target = to or previous_version(facts)
        if target is None:
            raise DeployError(spec.alias, f"no previous version to roll back to (installed: {', '.join(facts.versions)}, "
                                          f"current: {facts.current or 'none'})")
        if target not in facts.versions:
            raise DeployError(spec.alias, f"version {target} is no longer installed there (installed: "
                                          f"{', '.join(facts.versions)})")
        was = facts.current
        if was == target and facts.hive_running:
            return target, was
        run.update(spec.alias, f"switching current back to {target}" + (f" (was {was})" if was else ""))
        await steps.switch(t, facts, target)
        run.update(spec.alias, "restarting the hive on " + target)
        await steps.start(t, facts, restart=facts.hive_running)
        run.update(spec.alias, f"waiting for the hive to answer at {spec.url}")
        await steps.wait_hive(t, spec, facts, run.token)
        if drop_failed and was and was != target:
            run.update(spec.alias, f"removing the failed version {was}")
            await steps.prune(t, facts, (was,))
        await _record(t, spec, facts, target, None if drop_failed else was)
        return target, was
    finally:
        await t.close()


async def _record(t: Transport, spec: HostSpec, facts: HostFacts, release: str, previous: str | None) -> None:
    cfg = (facts.marker or {}).get("config_hash", "")
    value = marker(release, release.split("-", 1)[0], cfg, spec, facts, previous if previous != release else None)
    await steps.write_files(t, spec.python, [RemoteFile(f"{facts.install_dir}/marker.json", marker_json(value) + "\n", 0o644)])
