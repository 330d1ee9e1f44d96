"""Addresses: what counts as this machine only."""

from __future__ import annotations

import ipaddress
import socket


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name, with or without IPv6 brackets) reaches this machine only."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_open_bind(program: str, host: str, token: str | None) -> None:
    """Exit when a daemon would serve beyond this machine with nothing guarding its endpoints."""
    if not is_loopback(host) and not token:
        raise SystemExit(
            f"{program}: refusing to listen on {host} without a cluster token: anyone on the network could use "
            "it; pass --token-file (rbee-keeper deploy does) or bind 127.0.0.1"
        )


def port_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def connect_host(bind_host: str) -> str:
    """The address this machine uses to reach a server bound to ``bind_host`` (a wildcard means loopback)."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "") else ("::1" if bind_host == "::" else bind_host)
