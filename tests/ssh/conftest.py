"""Fixtures for end-to-end deploys against real OpenSSH hosts (Debian containers, see hosts.py).

These tests never skip: without a Docker engine, debootstrap or root they fail and say what is missing
(.ci/run installs all of it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import asyncssh
import pytest

from rbee_fleet.deploy.wheelhouse import Payload
from tests.ssh.hosts import DockerEngine, EngineUnavailable, TestHost, build_image, start_host
from tests.ssh.support import Keys, prebuild_wheelhouse

pytestmark = pytest.mark.ssh


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    try:
        engine = DockerEngine().start()
    except EngineUnavailable as exc:
        pytest.fail(f"the SSH test hosts need a Docker engine: {exc}", pytrace=False)
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def host_image(docker_engine: DockerEngine) -> str:
    try:
        return build_image()
    except EngineUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("ssh-keys")
    good, wrong = asyncssh.generate_private_key("ssh-ed25519"), asyncssh.generate_private_key("ssh-ed25519")
    good.write_private_key(str(d / "id_good"))
    wrong.write_private_key(str(d / "id_wrong"))
    for name in ("id_good", "id_wrong"):
        (d / name).chmod(0o600)  # as OpenSSH's client demands of a private key
    return Keys(d / "id_good", d / "id_wrong", good.export_public_key().decode().strip())


@pytest.fixture(scope="session")
def offline_wheelhouse() -> Payload:
    return prebuild_wheelhouse()


class HostPool:
    """Containers started on demand, each on 127.0.0.N, all stopped at the end."""

    def __init__(self, image: str, keys: Keys) -> None:
        self.image, self.keys = image, keys
        self.hosts: dict[str, TestHost] = {}

    def start(self, name: str, address: str) -> TestHost:
        host = start_host(name, address, self.keys.public, self.image)
        self.hosts[name] = host
        return host

    def stop_all(self) -> None:
        for host in self.hosts.values():
            with contextlib.suppress(Exception):  # most are not paused
                host.unpause()
            host.stop()


@pytest.fixture(scope="module")
def host_pool(host_image: str, ssh_keys: Keys) -> Iterator[HostPool]:
    pool = HostPool(host_image, ssh_keys)
    yield pool
    pool.stop_all()


