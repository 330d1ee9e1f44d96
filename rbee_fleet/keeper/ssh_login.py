"""An interactive OpenSSH login to an inventory host (the TUI's shell action), built from the same SSH
target as deploys, with the inventory's port, key and the keeper's trusted host keys."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.deploy.hosts import ssh_target
from rbee_fleet.deploy.targets import SSHTarget
from rbee_fleet.keeper.context import KeeperContext


def ssh_command(ctx: KeeperContext, alias: str) -> list[str]:
    """The OpenSSH command line that logs the operator into ``alias`` (for the TUI's shell action).

    Built from the same SSH target as deploys, with the inventory's port, key and the keeper's trusted host
    keys. Behind a ``proxy_jump`` each hop is reached through a ``ProxyCommand`` carrying that hop's own port,
    key and known hosts (``ssh -J`` would log into a jump host with the user's ssh config alone); a jump
    host that is not a hive (a ``~/.ssh/config`` Host, ``user@host[:port]``) is passed as it is.
    """
    decl = ctx.inventory.hives.get(alias)
    if decl is None:
        raise OperationFailed(f"no host {alias!r} in the inventory")
    if decl.transport == "local":
        # No SSH to this machine: a login shell in the hive's install directory (the home if there is none).
        install = os.path.expanduser(decl.install_dir or ctx.inventory.defaults.install_dir)
        shell = os.environ.get("SHELL") or "/bin/sh"
        return ["/bin/sh", "-c", 'cd "$1" 2>/dev/null || cd; exec "$2" -l', "sh", install, shell]
    try:
        target = ssh_target(ctx.inventory, alias)
    except ValueError as exc:
        raise OperationFailed(f"{alias}: {exc}") from None
    keys = ctx.host_keys()
    files = [str(p) for p in (*keys.user_files, keys.keeper_file)]
    known = "UserKnownHostsFile=" + " ".join(f'"{p}"' if " " in p else p for p in files)
    return ["ssh", *_ssh_options(target, known), _ssh_destination(target)]


def _ssh_options(t: SSHTarget, known: str) -> list[str]:
    opts: list[str] = []
    if t.port not in (None, 22):
        opts += ["-p", str(t.port)]
    if t.identity_file:
        opts += ["-i", str(Path(t.identity_file).expanduser()), "-o", "IdentitiesOnly=yes"]
    opts += ["-o", known]
    if t.jump is not None:
        opts += ["-o", "ProxyCommand=" + _proxy_command(t.jump, known)]
    return opts


def _proxy_command(hop: SSHTarget, known: str) -> str:
    """The command ssh runs to reach its next host through ``hop``; ``%h:%p`` is that next host.

    ssh expands ``%`` tokens in a ProxyCommand, so everything but that one token is escaped (``%%``),
    which also keeps a nested hop's tokens for the ssh that runs it.
    """
    args = [a.replace("%", "%%") for a in ("ssh", *_ssh_options(hop, known))]
    return shlex.join([*args, "-W", "%h:%p", _ssh_destination(hop).replace("%", "%%")])


def _ssh_destination(t: SSHTarget) -> str:
    return f"{t.user}@{t.host}" if t.user else t.host
