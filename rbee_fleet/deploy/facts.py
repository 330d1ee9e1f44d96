"""Facts about a host: one shell probe, run in a single round trip, and a pure parser of its output.

The probe prints ``key=value`` lines; ``parse_facts`` turns them into ``HostFacts``, and
``preflight_problems`` says, one line each, what keeps the hive from running there. Both are tested
on recorded outputs without any host.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

MIN_PYTHON = (3, 10)
MIN_FREE_MB = 1024  # a venv with llama-server and its dependencies takes about 300 MB; models more


def remote_path(path: str) -> str:
    """``path`` as a shell word in which a leading ``~`` is the remote user's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


# One interpreter start for every Python fact (pip's version is read without importing pip).
_PYTHON_PROBE = """
import sys, importlib.util as u
print("python_version=%d.%d.%d" % sys.version_info[:3])
print("venv=%d" % (u.find_spec("venv") is not None))
print("ensurepip=%d" % (u.find_spec("ensurepip") is not None))
try:
    import importlib.metadata as m
    print("pip=" + m.version("pip"))
except Exception:
    pass
"""


def probe_command(python: str, install_dir: str, port: int) -> str:
    """The shell script that prints every fact in one round trip."""
    py = shlex.quote(python)
    inst = remote_path(install_dir)
    return f"""
INSTALL={inst}
PYPROBE={shlex.quote(_PYTHON_PROBE)}
echo "home=$HOME"
echo "user=$(id -un)"
echo "uid=$(id -u)"
echo "install_dir=$INSTALL"
echo "kernel=$(uname -sm)"
echo "nproc=$(nproc 2>/dev/null || echo 0)"
sed -n 's/^model name[[:space:]]*: */cpu_model=/p' /proc/cpuinfo 2>/dev/null | head -n 1
sed -n -E 's/^(flags|Features)[[:space:]]*: */cpu_flags=/p' /proc/cpuinfo 2>/dev/null | head -n 1
sed -n 's/^MemTotal: *\\([0-9]*\\) kB/mem_total_kb=\\1/p; s/^MemAvailable: *\\([0-9]*\\) kB/mem_available_kb=\\1/p' /proc/meminfo 2>/dev/null
if command -v {py} >/dev/null 2>&1; then
  echo "python_path=$(command -v {py})"
  {py} -c "$PYPROBE" 2>/dev/null
fi
d="$INSTALL"; while [ ! -d "$d" ]; do d=$(dirname "$d"); done
df -Pk "$d" 2>/dev/null | awk 'NR==2 {{print "disk_free_kb=" $4}}'
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits 2>/dev/null | sed 's/^/gpu=/'
fi
if ls /dev/dri/renderD* >/dev/null 2>&1 && ldconfig -p 2>/dev/null | grep -q 'libvulkan[.]so[.]1'; then echo "vulkan=1"; fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then echo "systemd=1"; else echo "systemd=0"; fi
if command -v ss >/dev/null 2>&1; then
  ss -Hltn "sport = :{port}" 2>/dev/null | head -n 20 | awk '{{print "port_listener=" $4}}'
fi
if [ -f "$INSTALL/marker.json" ]; then echo "marker=$(tr -d '\\n' < "$INSTALL/marker.json")"; fi
if [ -L "$INSTALL/current" ]; then echo "current=$(readlink "$INSTALL/current")"; fi
for v in "$INSTALL"/versions/*/; do [ -f "$v.complete" ] && echo "version_dir=$(basename "$v")"; done 2>/dev/null
if [ -x "$INSTALL/bin/rbee-hive-ctl" ]; then echo "hive=$("$INSTALL/bin/rbee-hive-ctl" status 2>/dev/null | head -n 1)"; fi
true
"""


@dataclass(frozen=True)
class HostFacts:
    home: str = ""
    user: str = ""
    uid: int = -1
    install_dir: str = ""
    kernel: str = ""
    cpu_model: str = ""
    cpu_flags: tuple[str, ...] = ()  # /proc/cpuinfo's: which of llama-server's CPU variants the host can run
    cpus: int = 0
    mem_total_mb: int = 0
    mem_available_mb: int = 0
    python_path: str | None = None
    python_version: tuple[int, int, int] | None = None
    has_venv: bool = False
    has_ensurepip: bool = False
    pip_version: tuple[int, ...] | None = None
    disk_free_mb: int | None = None
    gpus: tuple[str, ...] = ()
    systemd: bool = False
    port_listeners: tuple[str, ...] = ()  # local addresses listening on the hive port (host:port)
    marker: dict[str, Any] | None = None
    current: str | None = None  # the version dir ``current`` points to
    versions: tuple[str, ...] = ()  # complete version dirs
    hive_pid: int | None = None  # the running hive, verified against its command line
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    @property
    def python_tag(self) -> str | None:
        return f"{self.python_version[0]}.{self.python_version[1]}" if self.python_version else None

    @property
    def hive_running(self) -> bool:
        return self.hive_pid is not None

    @property
    def host_pip_targets_venvs(self) -> bool:
        """Whether the host's pip can install into another environment (``pip --python``, pip 22.3+)."""
        return self.pip_version is not None and self.pip_version >= (22, 3)

    def summary(self) -> str:
        py = ".".join(map(str, self.python_version)) if self.python_version else "no python"
        gpu = f", GPU {', '.join(self.gpus)}" if self.gpus else ""
        return f"Python {py}, {self.cpus} CPUs, {self.mem_total_mb // 1024} GiB RAM{gpu}"


def _version(text: str) -> tuple[int, ...] | None:
    nums = re.findall(r"\d+", text)
    return tuple(int(n) for n in nums) if nums else None


def parse_facts(output: str) -> HostFacts:
    values: dict[str, str] = {}
    gpus: list[str] = []
    versions: list[str] = []
    listeners: list[str] = []
    for raw in output.splitlines():
        key, sep, value = raw.partition("=")
        if not sep or not re.fullmatch(r"[a-z_]+", key):
            continue
        value = value.strip()
        if key == "gpu":
            gpus.append(value)
        elif key == "version_dir":
            versions.append(value)
        elif key == "port_listener":
            listeners.append(value)
        else:
            values.setdefault(key, value)
    pyv = _version(values.get("python_version", ""))
    marker: dict[str, Any] | None = None
    if values.get("marker"):
        try:
            loaded = json.loads(values["marker"])
            marker = loaded if isinstance(loaded, dict) else None
        except ValueError:
            marker = None
    hive = values.get("hive", "")
    hive_pid = int(hive.split()[1]) if re.fullmatch(r"running \d+", hive) else None
    disk = values.get("disk_free_kb")
    return HostFacts(
        home=values.get("home", ""),
        user=values.get("user", ""),
        uid=int(values["uid"]) if values.get("uid", "").isdigit() else -1,
        install_dir=values.get("install_dir", ""),
        kernel=values.get("kernel", ""),
        cpu_model=values.get("cpu_model", ""),
        cpu_flags=tuple(values.get("cpu_flags", "").split()),
        cpus=int(values["nproc"]) if values.get("nproc", "").isdigit() else 0,
        mem_total_mb=int(values.get("mem_total_kb", "0") or 0) // 1024,
        mem_available_mb=int(values.get("mem_available_kb", "0") or 0) // 1024,
        python_path=values.get("python_path") or None,
        python_version=(pyv + (0, 0, 0))[:3] if pyv else None,  # type: ignore[arg-type]
        has_venv=values.get("venv") == "1",
        has_ensurepip=values.get("ensurepip") == "1",
        pip_version=_version(values.get("pip", "")),
        disk_free_mb=int(disk) // 1024 if disk and disk.isdigit() else None,
        gpus=tuple(gpus),
        systemd=values.get("systemd") == "1",
        port_listeners=tuple(listeners),
        marker=marker,
        current=values.get("current", "").rstrip("/").rsplit("/", 1)[-1] or None,
        versions=tuple(sorted(versions)),
        hive_pid=hive_pid,
        extra={k: values[k] for k in ("vulkan",) if k in values},
    )


def _listener_host(listener: str) -> str:
    host = listener.rsplit(":", 1)[0]
    return host.strip("[]").split("%", 1)[0]


def port_taken(facts: HostFacts, bind: str) -> str | None:
    """The listener that would stop a hive binding ``bind`` on the probed port, if any."""
    wildcard = {"0.0.0.0", "*", "::", ""}
    for listener in facts.port_listeners:
        host = _listener_host(listener)
        if host in wildcard or bind in wildcard or host == bind:
            return listener
    return None


def preflight_problems(facts: HostFacts, python: str, port: int, bind: str, *, need_install: bool,
                       need_pip: bool = False) -> list[str]:
    """What keeps the hive from being installed or started here; empty when all is well."""
    problems = []
    if need_install:
        if facts.python_version is None:
            problems.append(f"no {python} on the host (Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+ is needed)")
        elif facts.python_version[:2] < MIN_PYTHON:
            have = ".".join(map(str, facts.python_version))
            problems.append(f"Python {have} is too old ({python}); Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+ is needed")
        elif not facts.has_venv:
            problems.append(f"{python} has no venv module (on Debian/Ubuntu: apt install python3-venv)")
        elif need_pip and not facts.host_pip_targets_venvs and not facts.has_ensurepip:
            problems.append(f"{python} has neither pip 22.3+ nor ensurepip to install with "
                            "(on Debian/Ubuntu: apt install python3-venv python3-pip)")
        if facts.disk_free_mb is not None and facts.disk_free_mb < MIN_FREE_MB:
            problems.append(f"only {facts.disk_free_mb} MB free under {facts.install_dir}; {MIN_FREE_MB} MB are needed")
    taken = port_taken(facts, bind)
    if taken and not facts.hive_running:
        problems.append(f"port {port} is already in use by another program (listening on {taken})")
    return problems
