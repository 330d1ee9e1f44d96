"""Typed deploy failures. Each names its host and says why in one line, for the per-host result."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rbee_fleet.deploy.host_keys import HostKey


class DeployError(Exception):
    """A host could not be brought to the inventory's state; ``reason`` is the one-line cause.

    Failures that happen once the host's key is known (refused keys, refused logins) carry it as
    ``host_key``, so a front end can show the operator the fingerprint.
    """

    kind = "failed"

    def __init__(self, host: str, reason: str, *, host_key: HostKey | None = None) -> None:
        super().__init__(f"{host}: {reason}")
        self.host = host
        self.reason = reason
        self.host_key = host_key


class ConnectFailed(DeployError):
    """The host could not be reached (timeout, refused, no route, name not found)."""

    kind = "unreachable"


class ConnectTimeout(ConnectFailed):
    kind = "timeout"


class ConnectRefused(ConnectFailed):
    kind = "refused"


class AuthFailed(DeployError):
    kind = "auth"


class HostKeyUnknown(DeployError):
    """The host's key is in no known_hosts file and trust-on-first-use was not asked for."""

    kind = "host-key-unknown"


class HostKeyChanged(DeployError):
    """The host presents a key other than the recorded one: refused, whatever the flags say."""

    kind = "host-key-changed"


class CommandFailed(DeployError):
    kind = "command"


class CommandTimeout(CommandFailed):
    kind = "command-timeout"


class HiveNotReady(DeployError):
    kind = "hive"


class WheelhouseError(Exception):
    """Building the wheelhouse on the operator machine failed (not tied to one host)."""
