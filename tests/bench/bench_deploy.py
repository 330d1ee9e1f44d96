"""Deploy wall time over real SSH: 1 fresh host, then 4 fresh hosts at once, a no-change redeploy of 4, and a
config-change rollout of 4 (every worker's ``ctx_size`` changed: each replaced beside the old one, in
batches of 2, each host health-gated).

Targets (issues 3 and 12): 4 hosts within 1.5x of one host; a no-change redeploy of 4 hosts under 1 s.
The wheelhouse is built (or taken from the cache) before timing, so the figures are about deploying.
Hosts are Debian containers on 127.0.0.21-25 (see tests/ssh/hosts.py).
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import psutil

from tests.ssh.hosts import DockerEngine, TestHost, build_image, start_host
from tests.ssh.support import Keeper, Keys, prebuild_wheelhouse, write_fleet_inventory
from tests.support import procs

ONE = {"b1": "127.0.0.21"}
FOUR = {"b2": "127.0.0.22", "b3": "127.0.0.23", "b4": "127.0.0.24", "b5": "127.0.0.25"}


@dataclass
class Run:
    wall: float
    results: dict[str, dict]
    keeper_cpu: float  # CPU seconds during the run: the keeper process
    queen_cpu: float  # the queen (and the workers it starts nowhere: they run on the hosts)
    hosts_cpu: float  # every test host (sshd, untar, the hive, its workers)

    @property
    def cpu(self) -> float:
        return self.keeper_cpu + self.queen_cpu + self.hosts_cpu

    def slowest(self) -> float:
        return max(float(r["elapsed_s"]) for r in self.results.values())


def _cpu(hosts: list[TestHost], queen: procs.Proc) -> tuple[float, float, float]:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    q = psutil.Process(queen.pid).cpu_times()
    return (children.ru_utime + children.ru_stime, q.user + q.system, sum(h.cpu_seconds() or 0.0 for h in hosts))


def _deploy(keeper: Keeper, limit: str, hosts: list[TestHost], queen: procs.Proc, *extra: str) -> Run:
    cpu0 = _cpu(hosts, queen)
    started = time.monotonic()
    code, results, proc = keeper.deploy("--accept-new-host-keys", "--limit", limit, *extra)
    wall = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"deploy of {limit} failed:\n{json.dumps(results, indent=2)}\n{proc.stderr[-2000:]}")
    keeper, queen_cpu, hosts_cpu = (after - before for after, before in zip(_cpu(hosts, queen), cpu0))
    return Run(wall, results, keeper, queen_cpu, hosts_cpu)


def _keeper_start(keeper: Keeper) -> float:
    """Wall time of the keeper starting and exiting (``--version`` imports all a deploy does): the part of a
    no-change redeploy that no host causes."""
    started = time.monotonic()
    keeper.run("--version")
    return time.monotonic() - started


def _prebuild() -> float:
    started = time.monotonic()
    prebuild_wheelhouse()
    return time.monotonic() - started


def main() -> int:
    engine = DockerEngine().start()
    image = build_image()
    hosts = []
    queen = None
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp_name:
        tmp = Path(tmp_name)
        key = asyncssh.generate_private_key("ssh-ed25519")
        key.write_private_key(str(tmp / "id"))
        keys = Keys(tmp / "id", tmp / "id", key.export_public_key().decode().strip())
        try:
            hosts = [start_host(name, addr, keys.public, image) for name, addr in {**ONE, **FOUR}.items()]
            port = procs.free_port()
            inventory = write_fleet_inventory(tmp / "bench.toml", port, {n: {"address": a} for n, a in {**ONE, **FOUR}.items()}, keys)
            keeper = Keeper(tmp / "home", inventory)
            queen = procs.start_queen(tmp, inventory, keeper.home, port)
            build = _prebuild()
            one = _deploy(keeper, ",".join(ONE), hosts, queen)
            four = _deploy(keeper, ",".join(FOUR), hosts, queen)
            again = _deploy(keeper, ",".join(FOUR), hosts, queen)
            changed = [h for h, r in again.results.items() if r["status"] != "ok"]
            start = min(_keeper_start(keeper) for _ in range(3))
            inventory.write_text(inventory.read_text().replace("ctx_size = 512", "ctx_size = 1024"))
            rollout = _deploy(keeper, ",".join(FOUR), hosts, queen, "--batch", "2")
            replaced = sum(1 for r in rollout.results.values() for w in r["workers"] if w["action"] == "replace")
            gated = sum(1 for r in rollout.results.values() if r["gate"] == "passed")
            cores = os.cpu_count() or 1
            ratio = four.wall / one.wall
            print(f"wheelhouse ready in {build:.1f} s (cached after the first build)")
            print(f"deploy 1 fresh host:            {one.wall:6.2f} s wall (in-run {one.slowest():.2f} s), {one.cpu:5.1f} CPU-s")
            print(f"  CPU-s of that: keeper {one.keeper_cpu:.1f}, queen {one.queen_cpu:.1f}, host {one.hosts_cpu:.1f}")
            print(f"deploy 4 fresh hosts at once:   {four.wall:6.2f} s wall (slowest host {four.slowest():.2f} s), {four.cpu:5.1f} CPU-s")
            print(f"  CPU-s of that: keeper {four.keeper_cpu:.1f}, queen {four.queen_cpu:.1f}, hosts {four.hosts_cpu:.1f}")
            print(f"ratio 4 hosts / 1 host:         {ratio:6.2f}x  (target <= 1.5x) {'MET' if ratio <= 1.5 else 'MISSED'}")
            print(f"  all test hosts share this machine's {cores} cores: 4 hosts need {four.cpu:.1f} CPU-s, so no schedule "
                  f"beats {four.cpu / cores:.1f} s here ({four.cpu / cores / one.wall:.2f}x of one host); "
                  f"hosts with their own CPUs would not queue for these")
            print(f"no-change redeploy of 4 hosts:  {again.wall:6.2f} s wall, keeper start included "
                  f"(in-run {again.slowest():.2f} s)  (target < 1 s) {'MET' if again.wall < 1 else 'MISSED'}")
            print(f"  of that, the keeper's own start (Python and its imports: asyncssh, aiohttp, pydantic, rich; "
                  f"best of 3): {start:.2f} s")
            print(f"hosts changed by the redeploy:  {changed or 'none'}")
            print(f"config-change rollout of 4 hosts (ctx_size 512 -> 1024, --batch 2): {rollout.wall:6.2f} s wall, "
                  f"{replaced} worker(s) replaced, {gated} host(s) through the health gate, {rollout.cpu:5.1f} CPU-s")
            return 0
        finally:
            if queen is not None:
                queen.stop()
            for host in hosts:
                host.stop()
            engine.stop()


if __name__ == "__main__":
    raise SystemExit(main())
