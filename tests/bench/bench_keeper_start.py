"""How long a keeper command takes from start to exit, against the same commands at an earlier revision.

The baseline is the keeper as it was before commands were loaded on demand (``--baseline REV``, default
``61cb9de``), checked out into a temporary git worktree and run with the same interpreter and venv, so
the two differ only in rbee-fleet's own code. Each command runs against a real local queen (the embedded
hive, no worker: only the keeper's own start and one status request are timed), the two sides taking
turns run by run so that machine noise falls on both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from tests.support import procs

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BASELINE = "61cb9de"  # before the keeper's commands were imported on demand
COMMANDS = (["status", "--json"], ["status"], ["lock", "status"], ["--help"])


SITE = sysconfig.get_paths()["purelib"]


def _time(code: Path, args: list[str], env: dict[str, str], cwd: Path) -> float:
    """One run of the keeper whose code is at ``code``. ``-S`` with the venv's site-packages on the path: the
    venv's editable install of this checkout would otherwise win over any other copy of rbee-fleet (both
    sides are run the same way, so both skip the same site processing), from ``cwd``, outside both copies
    (Python puts the working directory first on the path)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-S", "-m", "rbee_fleet.keeper", *args],
                   env={**env, "PYTHONPATH": f"{code}{os.pathsep}{SITE}"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=False, cwd=cwd)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_keeper_start")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv or [])
    with tempfile.TemporaryDirectory(prefix="rbee-keeper-start-") as tmp:
        tmp_path = Path(tmp)
        base = tmp_path / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.baseline],
                       check=True, capture_output=True)
        port = procs.free_port()
        inventory = procs.write_inventory(tmp_path / "fleet.toml", port=port, worker_port_base=procs.free_port_range(4),
                                          workers=[])
        home = tmp_path / "home"
        queen = procs.start_queen(tmp_path, inventory, home, port)
        env = {**os.environ, "RBEE_HOME": str(home), "RBEE_INVENTORY": str(inventory)}
        try:
            print(f"\n== keeper start: each command {args.runs} times, interleaved with the keeper at {args.baseline} ==")
            print(f"{'command':<24} {'now median':>11} {'baseline median':>16} {'ratio':>7}")
            for command in COMMANDS:
                now: list[float] = []
                then: list[float] = []
                _time(REPO, command, env, tmp_path), _time(base, command, env, tmp_path)  # warm caches, bytecode
                for _ in range(args.runs):
                    now.append(_time(REPO, command, env, tmp_path))
                    then.append(_time(base, command, env, tmp_path))
                a, b = statistics.median(now), statistics.median(then)
                print(f"{' '.join(command):<24} {a * 1000:>9.0f} ms {b * 1000:>14.0f} ms {a / b:>7.2f}")
        finally:
            queen.stop()
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False,
                           capture_output=True)


if __name__ == "__main__":
    main(sys.argv[1:])
