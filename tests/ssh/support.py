"""Helpers for the SSH end-to-end tests: the keeper as a subprocess, fleet inventories, waiting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rbee_fleet.deploy.wheelhouse import Payload
from tests.ssh.hosts import HOST_PYTHON, HOST_USER

REPO = Path(__file__).resolve().parents[2]
# Built wheels and wheelhouses are kept across runs in the checkout (llama-server's build is machine-wide,
# in ~/.cache/rbee-fleet, made by `just setup`).
CACHE_DIR = Path(os.environ.get("RBEE_TEST_CACHE_DIR", REPO / ".cache" / "rbee"))


def prebuild_wheelhouse() -> Payload:
    """What offline test hosts get, built (or taken from the cache) before any deploy runs.

    It holds the machine's llama-server build (``just setup`` made it; a machine without one builds it first).
    """
    from rbee_fleet.contracts.vocabulary import BUILTIN_MODELS
    from rbee_fleet.deploy.wheelhouse import Release, WheelhouseBuilder, WheelhouseSpec

    builder = WheelhouseBuilder(Release.from_source(REPO), CACHE_DIR)
    return builder.build(WheelhouseSpec("offline", HOST_PYTHON, "x86_64", packages=(BUILTIN_MODELS["smollm2"].requirement,)))


@dataclass(frozen=True)
class Keys:
    good: Path  # authorized on every test host
    wrong: Path  # authorized nowhere
    public: str


@dataclass
class Keeper:
    """Runs ``rbee-keeper`` as the operator would, with its own RBEE_HOME."""

    home: Path
    inventory: Path

    def env(self) -> dict[str, str]:
        env = {**os.environ, "RBEE_HOME": str(self.home), "RBEE_CACHE_DIR": str(CACHE_DIR), "COLUMNS": "200"}
        env.pop("RBEE_INVENTORY", None)
        return env

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "rbee_fleet.keeper", *args]
        if "-i" not in args:
            cmd += ["-i", str(self.inventory)]
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=self.env(), cwd=REPO,
                              stdin=subprocess.DEVNULL)

    def deploy(self, *args: str, timeout: float = 900) -> tuple[int, dict[str, dict[str, object]], subprocess.CompletedProcess[str]]:
        """``deploy --json``; returns (exit code, results by host, the process)."""
        proc = self.run("deploy", "--json", *args, timeout=timeout)
        try:
            body = json.loads(proc.stdout)
        except ValueError:
            raise AssertionError(f"deploy printed no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}") from None
        return proc.returncode, {h["host"]: h for h in body["hosts"]}, proc


def write_fleet_inventory(path: Path, queen_port: int, hosts: dict[str, dict[str, object]], keys: Keys,
                          workers: int = 1) -> Path:
    lines = [
        "[queen]", 'host = "127.0.0.1"', f"port = {queen_port}", "heartbeat_interval_s = 0.5",
        "heartbeat_timeout_s = 2.0", "admission_timeout_s = 20", "",
        "[defaults]", f'ssh_user = "{HOST_USER}"', f'identity_file = "{keys.good}"', "connect_timeout_s = 3", "",
    ]
    for alias, extra in hosts.items():
        lines.append(f"[hives.{alias}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
        lines.append("")
        for _ in range(workers):
            lines += [f"[[hives.{alias}.workers]]", 'model = "smollm2"', "threads = 1", "ctx_size = 512", ""]
    path.write_text("\n".join(lines))
    return path




def bumped_source(tmp: Path, version: str) -> Path:
    """A copy of this checkout's package under another version: a new release to deploy (made once per ``tmp``)."""
    src = tmp / f"rbee-fleet-{version}"
    if not src.exists():
        shutil.copytree(REPO / "rbee_fleet", src / "rbee_fleet", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        (src / "rbee_fleet" / "_version.py").write_text(f'__version__ = "{version}"\n')
    return src
