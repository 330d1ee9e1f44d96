"""Opening a host's transport: local processes for this machine, else an SSH connection.

The SSH transport (and asyncssh with it, about a quarter of a second of the keeper's start) is imported
only when a host is first reached over SSH, so keeper commands that reach none start without it.
"""

from __future__ import annotations

from rbee_fleet.deploy.host_keys import HostKeyStore
from rbee_fleet.deploy.local_transport import LocalTransport
from rbee_fleet.deploy.targets import LocalTarget, Target
from rbee_fleet.deploy.transport import Transport


async def open_transport(target: Target, keys: HostKeyStore, *, accept_new: bool = False) -> Transport:
    """A transport to ``target``; over SSH the host key is checked (``accept_new``: trust a first-seen key)."""
    if isinstance(target, LocalTarget):
        return LocalTransport(target.alias)
    from rbee_fleet.deploy.ssh_transport import connect

    return await connect(target, keys, accept_new=accept_new)
