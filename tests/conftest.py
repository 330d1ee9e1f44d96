"""Shared fixtures: real processes on loopback, each test's files under its own tmp dir."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from tests.support import procs
from tests.support.sshd import openssh_server, write_client_key


@pytest.fixture(scope="session")
def model_path() -> str:
    return procs.model_path()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own RBEE_HOME, so nothing touches the user's files or other tests'."""
    home = tmp_path / "rbee-home"
    monkeypatch.setenv("RBEE_HOME", str(home))
    monkeypatch.delenv("RBEE_INVENTORY", raising=False)
    monkeypatch.delenv("RBEE_API_KEYS", raising=False)
    return home


@pytest.fixture
def home(_isolated_home: Path) -> Path:
    return _isolated_home


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def standalone_worker(module_tmp: Path) -> procs.Proc:
    """One real worker process serving smollm2 with llama.cpp, not attached to any queen."""
    proc = procs.start_worker(module_tmp, max_queue=1, ctx_size=512)
    yield proc
    proc.stop()


@pytest.fixture
def client_key(tmp_path: Path) -> Path:
    """A fresh ed25519 key for the keeper to log in with."""
    return write_client_key(tmp_path / "id_test")


@pytest.fixture
def sshd(client_key: Path, tmp_path: Path) -> Iterator[tuple[asyncssh.SSHKey, int]]:
    """A real OpenSSH server on loopback that lets ``client_key`` in: (its host key, its port)."""
    with openssh_server(client_key, tmp_path / "sshd") as server:
        yield server


def pytest_report_header(config: pytest.Config) -> str:
    return f"rbee-fleet tests: RBEE_HOME per test; CPU threads {os.cpu_count()}"
