"""The host probe's parser and the preflight checks, on recorded probe outputs (no host needed)."""

from __future__ import annotations

from rbee_fleet.deploy.facts import parse_facts, port_taken, preflight_problems, probe_command, remote_path

# Recorded from a Debian 12 test host (a container made by tests/ssh) with nothing installed yet.
FRESH_DEBIAN = """\
home=/home/rbee
user=rbee
uid=1000
install_dir=/home/rbee/.local/share/rbee-fleet
kernel=Linux x86_64
nproc=2
cpu_model=AMD EPYC
mem_total_kb=24684100
mem_available_kb=23937012
python_path=/usr/bin/python3
python_version=3.11.2
venv=1
ensurepip=1
pip=23.0.1
disk_free_kb=79895336
systemd=0
"""

# The same host after a deploy: a marker, two versions, the hive running under a pidfile.
DEPLOYED = FRESH_DEBIAN + """\
port_listener=127.0.0.2:9000
marker={"config_hash":"abc","install_source":"offline","mode":"pidfile","python":"3.11","release":"0.1.0-aaaa","schema":1,"version":"0.1.0"}
current=versions/0.1.0-aaaa
version_dir=0.1.0-aaaa
version_dir=0.0.9-bbbb
hive=running 4242
"""

# A root login on a systemd host with an NVIDIA GPU and an old Python without pip.
OLD_ROOT_GPU = """\
home=/root
user=root
uid=0
install_dir=/opt/rbee
kernel=Linux x86_64
nproc=16
mem_total_kb=65000000
python_path=/usr/bin/python3
python_version=3.8.10
venv=1
ensurepip=0
disk_free_kb=512000
gpu=NVIDIA GeForce RTX 3090, 24576
gpu=NVIDIA GeForce RTX 3060, 12288
systemd=1
port_listener=0.0.0.0:9000
"""


def test_fresh_host_parses_every_fact() -> None:
    f = parse_facts(FRESH_DEBIAN)
    assert (f.home, f.user, f.uid, f.is_root) == ("/home/rbee", "rbee", 1000, False)
    assert f.install_dir == "/home/rbee/.local/share/rbee-fleet"
    assert f.python_version == (3, 11, 2) and f.python_tag == "3.11"
    assert f.has_venv and f.has_ensurepip and f.pip_version == (23, 0, 1) and f.host_pip_targets_venvs
    assert f.cpus == 2 and f.mem_total_mb == 24684100 // 1024
    assert f.disk_free_mb == 79895336 // 1024
    assert not f.systemd and f.gpus == () and f.marker is None and f.versions == ()
    assert not f.hive_running and f.current is None
    assert preflight_problems(f, "python3", 9000, "127.0.0.2", need_install=True) == []


def test_deployed_host_reports_marker_versions_and_running_hive() -> None:
    f = parse_facts(DEPLOYED)
    assert f.marker is not None and f.marker["release"] == "0.1.0-aaaa"
    assert f.current == "0.1.0-aaaa"
    assert f.versions == ("0.0.9-bbbb", "0.1.0-aaaa")
    assert f.hive_pid == 4242 and f.hive_running
    # Our own hive holds the port: that is no conflict.
    assert preflight_problems(f, "python3", 9000, "127.0.0.2", need_install=False) == []


def test_old_python_small_disk_and_busy_port_each_give_a_reason() -> None:
    f = parse_facts(OLD_ROOT_GPU)
    assert f.is_root and f.systemd
    assert f.gpus == ("NVIDIA GeForce RTX 3090, 24576", "NVIDIA GeForce RTX 3060, 12288")
    assert f.pip_version is None and not f.host_pip_targets_venvs
    problems = preflight_problems(f, "python3", 9000, "10.0.0.7", need_install=True)
    assert any("Python 3.8.10 is too old" in p for p in problems)
    assert any("only 500 MB free under /opt/rbee" in p for p in problems)
    assert any("port 9000 is already in use" in p and "0.0.0.0:9000" in p for p in problems)


def test_missing_python_and_missing_venv() -> None:
    no_python = parse_facts("home=/home/x\nuid=1000\ninstall_dir=/home/x/r\ndisk_free_kb=99999999\n")
    assert preflight_problems(no_python, "python3.12", 9000, "h", need_install=True) == [
        "no python3.12 on the host (Python 3.10+ is needed)"
    ]
    no_venv = parse_facts(FRESH_DEBIAN.replace("venv=1", "venv=0"))
    assert "no venv module" in preflight_problems(no_venv, "python3", 9000, "h", need_install=True)[0]
    no_pip = parse_facts(FRESH_DEBIAN.replace("ensurepip=1", "ensurepip=0").replace("pip=23.0.1", "pip="))
    # Offline installs unpack a ready venv tree: no pip needed. Online installs run the host's pip.
    assert preflight_problems(no_pip, "python3", 9000, "h", need_install=True) == []
    online = preflight_problems(no_pip, "python3", 9000, "h", need_install=True, need_pip=True)
    assert "neither pip 22.3+ nor ensurepip" in online[0]
    # Already installed: Python checks no longer matter.
    assert preflight_problems(no_python, "python3.12", 9000, "h", need_install=False) == []


def test_port_conflicts_depend_on_the_bind_address() -> None:
    # Test hosts share one network namespace: another host's hive on 127.0.0.3 is no conflict for 127.0.0.2.
    other = parse_facts(FRESH_DEBIAN + "port_listener=127.0.0.3:9000\nport_listener=[::1]:9000\n")
    assert port_taken(other, "127.0.0.2") is None
    assert port_taken(other, "127.0.0.3") == "127.0.0.3:9000"
    assert port_taken(other, "0.0.0.0") == "127.0.0.3:9000"
    assert port_taken(parse_facts(FRESH_DEBIAN + "port_listener=*:9000\n"), "127.0.0.2") == "*:9000"


def test_garbage_lines_and_a_broken_marker_are_ignored() -> None:
    f = parse_facts("Welcome to the host!\nNot A Key=1\nmarker={not json\nhive=stopped\n" + FRESH_DEBIAN)
    assert f.uid == 1000 and f.marker is None and f.hive_pid is None


def test_probe_expands_the_remote_home_and_quotes_paths() -> None:
    assert remote_path("~/.local/share/rbee fleet") == "\"$HOME\"/'.local/share/rbee fleet'"
    assert remote_path("/opt/rbee") == "/opt/rbee"
    script = probe_command("python3", "~/x", 9000)
    assert 'INSTALL="$HOME"/x' in script and "sport = :9000" in script
