"""The hive's control script against real processes on this machine: it finds the hive by its process title
(``rbee-hive --home INSTALL ...``, which is what /proc shows once the hive has retitled itself), stops it, and
never signals a process whose command line is not this install's hive. On real hosts: tests/ssh/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rbee_fleet.deploy.facts import parse_facts
from rbee_fleet.deploy.plan import render_files
from tests.deploy.test_facts import FRESH_DEBIAN
from tests.deploy.test_plan import TOKEN, spec
from tests.support import procs


def _ctl(install: Path, tmp: Path) -> Path:
    facts = parse_facts(FRESH_DEBIAN.replace("install_dir=/home/rbee/.local/share/rbee-fleet", f"install_dir={install}"))
    text = next(f for f in render_files(spec(install_dir=str(install)), facts, TOKEN)
                if f.path.endswith("rbee-hive-ctl")).content
    path = tmp / "rbee-hive-ctl"
    path.write_text(text)
    return path


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_the_control_script_finds_and_stops_the_retitled_hive(tmp_path: Path) -> None:
    install = tmp_path / "install"
    (install / "run").mkdir(parents=True)
    ctl = _ctl(install, tmp_path)
    port = procs.free_port()
    hive = subprocess.Popen([sys.executable, "-m", "rbee_fleet.hive", "--home", str(install), "--hive-id", "t",
                             "--port", str(port)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        procs.wait_until(lambda: _cmdline(hive.pid).startswith(f"rbee-hive --home {install} --hive-id t "), 30,
                         what="the hive's process title")
        (install / "run" / "hive.pid").write_text(f"{hive.pid}\n")
        status = subprocess.run(["sh", str(ctl), "status"], capture_output=True, text=True, check=False)
        assert (status.returncode, status.stdout.strip()) == (0, f"running {hive.pid}")
        stopped = subprocess.run(["sh", str(ctl), "stop"], capture_output=True, text=True, check=False, timeout=60)
        assert stopped.stdout.strip() == "stopped"
        assert hive.wait(10) is not None and not (install / "run" / "hive.pid").exists()
    finally:
        if hive.poll() is None:
            hive.kill()
            hive.wait()


def test_a_pid_that_is_not_this_installs_hive_is_left_alone(tmp_path: Path) -> None:
    install = tmp_path / "install"
    (install / "run").mkdir(parents=True)
    ctl = _ctl(install, tmp_path)
    title = f"rbee-hive --home {tmp_path / 'other-install'} --hive-id t"  # another install's hive
    decoy = subprocess.Popen([sys.executable, "-c", "import setproctitle, sys, time; "
                              "setproctitle.setproctitle(sys.argv[1]); time.sleep(60)", title])
    try:
        procs.wait_until(lambda: _cmdline(decoy.pid).startswith("rbee-hive "), 10, what="the decoy's title")
        (install / "run" / "hive.pid").write_text(f"{decoy.pid}\n")
        status = subprocess.run(["sh", str(ctl), "status"], capture_output=True, text=True, check=False)
        assert (status.returncode, status.stdout.strip()) == (3, "stopped")
        subprocess.run(["sh", str(ctl), "stop"], capture_output=True, text=True, check=False, timeout=60)
        assert decoy.poll() is None  # not signalled
    finally:
        decoy.kill()
        decoy.wait()
