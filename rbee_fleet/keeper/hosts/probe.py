"""What a remote host is when the queen cannot tell: installed? hive running? or why SSH cannot say.

A probe connects (never trusting a new key), reads the host's facts and closes, bounded by the connect
timeout plus ``PROBE_GRACE_S``; it never raises for a host that cannot be probed: the probe says why.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from rbee_fleet.deploy import steps
from rbee_fleet.deploy.connect import open_transport
from rbee_fleet.deploy.errors import AuthFailed, ConnectFailed, DeployError, HostKeyChanged, HostKeyUnknown
from rbee_fleet.deploy.facts import HostFacts
from rbee_fleet.deploy.host_keys import HostKeyStore
from rbee_fleet.deploy.plan import HostSpec
from rbee_fleet.deploy.targets import SSHTarget

PROBE_GRACE_S = 20.0  # what a probe may take beyond the connect timeout (the facts script, closing)

ProbeState = Literal["not installed", "stopped", "running", "unreachable", "unknown"]


@dataclass(frozen=True)
class HostProbe:
    """A host's state as seen over its transport (installed? hive running?), or why it could not be seen."""

    alias: str
    state: ProbeState
    reason: str
    at: float  # when it was probed (time.monotonic)
    version: str | None = None  # the version ``current`` points to


def probe_result(spec: HostSpec, facts: HostFacts, at: float) -> HostProbe:
    if not facts.versions:
        return HostProbe(spec.alias, "not installed", f"no rbee-fleet under {facts.install_dir}", at)
    version = facts.current
    if facts.hive_running:
        return HostProbe(spec.alias, "running", f"the hive runs (pid {facts.hive_pid}, {version})", at, version)
    return HostProbe(spec.alias, "stopped", f"{version or 'rbee-fleet'} is installed; the hive is not running", at, version)


async def probe_host(spec: HostSpec, keys: HostKeyStore, at: float) -> HostProbe:
    """Connect (never trusting a new key), read the host's facts, close; bounded by the connect timeout plus
    ``PROBE_GRACE_S``. Never raises for a host that cannot be probed: the probe says why."""

    limit = spec.target.connect_timeout_s + PROBE_GRACE_S

    async def probe() -> HostProbe:
        t = await open_transport(spec.target, keys)
        try:
            return probe_result(spec, await steps.gather_facts(t, spec), at)
        finally:
            await asyncio.shield(t.close())

    try:
        return await asyncio.wait_for(probe(), limit)
    except asyncio.TimeoutError:
        how = "over SSH " if isinstance(spec.target, SSHTarget) else ""
        return HostProbe(spec.alias, "unreachable", f"no answer {how}within {limit:g} s", at)
    except (HostKeyUnknown, HostKeyChanged, AuthFailed) as exc:
        return HostProbe(spec.alias, "unknown", exc.reason, at)
    except ConnectFailed as exc:
        return HostProbe(spec.alias, "unreachable", exc.reason, at)
    except DeployError as exc:
        return HostProbe(spec.alias, "unknown", exc.reason, at)
