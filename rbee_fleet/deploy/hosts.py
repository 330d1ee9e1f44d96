"""From the inventory to deploy targets: one ``HostSpec`` per installed hive (every hive but the embedded
one), reached over SSH with its jump hosts resolved, or locally (``transport = "local"``)."""

from __future__ import annotations

import re

from rbee_fleet.common.inventory import HiveDecl, Inventory, InventoryError
from rbee_fleet.contracts.vocabulary import BUILTIN_MODELS
from rbee_fleet.deploy.plan import HostSpec
from rbee_fleet.deploy.targets import LocalTarget, SSHTarget

_JUMP_RE = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]]+\]|[^:@\s]+)(?::(?P<port>\d{1,5}))?$")


def installed_aliases(inv: Inventory) -> list[str]:
    """The hives the keeper installs: all but the one embedded in the queen."""
    return [alias for alias, hive in inv.hives.items() if not hive.embedded]


def select(inv: Inventory, limit: str | None, path: str = "<inventory>", *, embedded: bool = False) -> list[str]:
    """The installed hives to act on (with ``embedded``, every hive, the embedded one first): all of them, or
    those named in ``--limit a,b``."""
    found = inv.embedded_hive() if embedded else None
    candidates = ([found[0]] if found else []) + installed_aliases(inv)
    if not limit:
        return candidates
    wanted = [a.strip() for a in limit.split(",") if a.strip()]
    unknown = [a for a in wanted if a not in candidates]
    if found is None and (own := inv.embedded_hive()) and own[0] in unknown:
        raise InventoryError(path, None, "--limit", f"{own[0]!r} is the hive embedded in the queen, not an installed "
                                                    "one: `rbee-keeper up`, `down` and `deploy` manage it")
    if unknown:
        kind = "hive" if embedded else "installed hive"
        known = ", ".join(candidates) or "none"
        raise InventoryError(path, None, "--limit",
                             f"no {kind} named {', '.join(map(repr, unknown))} ({kind}s: {known})")
    return [a for a in candidates if a in wanted]


def ssh_target(inv: Inventory, alias: str, seen: tuple[str, ...] = ()) -> SSHTarget:
    hive = inv.hives[alias]
    d = inv.defaults
    return SSHTarget(
        alias=alias,
        host=hive.ssh_host or hive.address,
        # Unless the inventory says otherwise, a ~/.ssh/config entry's Port applies (else 22).
        port=hive.ssh_port or (d.ssh_port if "ssh_port" in d.model_fields_set else None),
        user=hive.ssh_user or d.ssh_user,
        identity_file=hive.identity_file or d.identity_file,
        jump=_jump(inv, hive, (*seen, alias)),
        connect_timeout_s=d.connect_timeout_s,
    )


def _jump(inv: Inventory, hive: HiveDecl, seen: tuple[str, ...]) -> SSHTarget | None:
    value = hive.proxy_jump
    if not value:
        return None
    if value in inv.hives:
        if value in seen:
            raise ValueError(f"proxy_jump loops back to {value!r}")
        return ssh_target(inv, value, seen)
    m = _JUMP_RE.match(value)
    if not m:
        raise ValueError(f"proxy_jump {value!r} is neither a hive alias nor user@host[:port]")
    return SSHTarget(alias=value, host=m["host"].strip("[]"), port=int(m["port"]) if m["port"] else None,
                     user=m["user"], connect_timeout_s=inv.defaults.connect_timeout_s)


def host_spec(inv: Inventory, alias: str) -> HostSpec:
    hive = inv.hives[alias]
    d = inv.defaults
    ops = tuple(inv.spawn_ops(alias))
    packages = tuple(sorted({BUILTIN_MODELS[op.model].requirement for op in ops if op.model in BUILTIN_MODELS}))
    return HostSpec(
        alias=alias,
        address=hive.address,
        port=hive.port or d.hive_port,
        bind_host=hive.bind_host,
        # The embedded hive is the queen's own (never connected to); a local one is reached without SSH.
        target=(LocalTarget(alias, d.connect_timeout_s) if hive.transport == "local" or hive.embedded
                else ssh_target(inv, alias)),
        install_dir=hive.install_dir or d.install_dir,
        install_source=hive.install_source or d.install_source,
        python=hive.python or d.python,
        queen_url=inv.queen.url(),
        worker_port_base=d.worker_port_base,
        heartbeat_interval_s=inv.queen.heartbeat_interval_s,
        command_timeout_s=d.command_timeout_s,
        packages=packages,
        workers=ops,
        memory_budget_mb=hive.memory_budget_mb,
        gpu_backends=tuple(hive.gpu_backends) if hive.gpu_backends is not None else None,
    )
