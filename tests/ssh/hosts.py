"""Real SSH test hosts: Debian containers running OpenSSH, each on its own loopback address.

The Docker engine is Debian's ``docker.io``, started here when it is not running (and stopped again
by whoever started it). The image is built once per machine from a ``debootstrap`` root filesystem and
``docker import``-ed, since no registry can be reached. Containers use host networking: each test host
binds sshd to ``127.0.0.N:22`` and its hive and workers to the same address, so a component that
advertises 127.0.0.1 instead of its host's address fails the tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # the reaper image cannot be pulled here

IMAGE = "rbee-fleet-test-host:bookworm-1"
PACKAGES = "openssh-server,python3,python3-venv,python3-pip,procps,iproute2"
MIRROR_ENV = "RBEE_TEST_DEBIAN_MIRROR"  # else the archive this machine's apt uses, else debootstrap's default
DOCKERD_LOG = Path(tempfile.gettempdir()) / "rbee-test-dockerd.log"
HOST_USER = "rbee"
HOST_PYTHON = "3.11"  # Debian 12's python3


class EngineUnavailable(RuntimeError):
    pass


def _docker(*args: str, timeout: float = 60, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=input is None, timeout=timeout,
                          check=check, input=input)


def engine_up() -> bool:
    try:
        return _docker("info", "--format", "{{.ServerVersion}}", timeout=20, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class DockerEngine:
    """The local Docker engine; ``start()`` launches ``dockerd`` only when none answers."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DockerEngine:
        if engine_up():
            return self
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            raise EngineUnavailable("dockerd is not installed (apt-get install docker.io; .ci/run does it)")
        if os.geteuid() != 0:
            raise EngineUnavailable("dockerd is not running and only root can start it")
        # Host networking only: no bridge, no iptables rules on this machine.
        with open(DOCKERD_LOG, "ab") as log:
            self.proc = subprocess.Popen([dockerd, "--iptables=false", "--ip-masq=false", "--bridge=none"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 60
        while not engine_up():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = DOCKERD_LOG.read_text(errors="replace")[-2000:]
                self.stop()
                raise EngineUnavailable(f"dockerd did not come up:\n{tail}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def apt_mirror(suite: str = "bookworm") -> str | None:
    """The Debian archive this machine's apt is configured with for ``suite`` (deb822 or one-line sources)."""
    found: list[str] = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith("#"))
            if suite in fields.get("Suites", "").split() and fields.get("Enabled", "yes").strip() != "no":
                found += fields.get("URIs", "").split()
    for path in (Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
            if m and m.group(2) == suite:
                found.append(m.group(1))
    return found[0] if found else None


def image_exists(image: str = IMAGE) -> bool:
    return _docker("image", "inspect", image, check=False).returncode == 0


def build_image(image: str = IMAGE) -> str:
    """Build the test-host image from a debootstrap rootfs unless it exists (about a minute, once)."""
    if image_exists(image):
        return image
    if shutil.which("debootstrap") is None:
        raise EngineUnavailable("debootstrap is not installed (apt-get install debootstrap; .ci/run does it)")
    work = Path(tempfile.mkdtemp(prefix="rbee-rootfs-"))
    rootfs = work / "rootfs"
    try:
        mirror = os.environ.get(MIRROR_ENV) or apt_mirror()
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(rootfs),
                        *([mirror] if mirror else [])], check=True, capture_output=True, timeout=1200)
        # An unprivileged user to deploy as; the operator's key goes in at container start.
        subprocess.run(["chroot", str(rootfs), "useradd", "-m", "-s", "/bin/bash", HOST_USER], check=True)
        for key in rootfs.glob("etc/ssh/ssh_host_*"):
            key.unlink()  # each container makes its own host keys
        (rootfs / "etc/apt/sources.list").write_text("")  # no package index, as on an offline host
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", image], stdin=tar.stdout, check=True, capture_output=True, timeout=600)
        tar.wait()
    except subprocess.CalledProcessError as exc:
        raise EngineUnavailable(f"building {image} failed: {exc}\n{(exc.stderr or b'')[-2000:]!r}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return image


# What each container runs: fresh host keys, the operator's key, then sshd on its own address.
_ENTRY = r"""
set -e
ssh-keygen -A >/dev/null
mkdir -p /run/sshd /home/{user}/.ssh
printf '%s\n' "$AUTHORIZED_KEY" > /home/{user}/.ssh/authorized_keys
chown -R {user}:{user} /home/{user}/.ssh && chmod 700 /home/{user}/.ssh && chmod 600 /home/{user}/.ssh/authorized_keys
exec /usr/sbin/sshd -D -e -o ListenAddress=$SSH_ADDRESS:22 -o MaxStartups=200 -o PasswordAuthentication=no \
    -o UseDNS=no -o PrintMotd=no -o ClientAliveInterval=0
"""


@dataclass
class TestHost:
    """One container: a machine reachable as ``user@address:22``."""

    __test__ = False  # not a test class

    name: str
    address: str
    container: object  # testcontainers DockerContainer

    @property
    def container_id(self) -> str:
        return self.container.get_wrapped_container().id  # type: ignore[attr-defined]

    def exec(self, command: str, user: str = HOST_USER, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``command`` in the container (``docker exec`` without ``-i``: no standard input)."""
        return _docker("exec", "-u", user, self.container_id, "bash", "-lc", command, timeout=timeout, check=False)

    def cpu_seconds(self) -> float | None:
        """CPU time used by everything in the container so far (cgroup v1 or v2), if the kernel tells."""
        cid = self.container_id
        candidates = [
            (Path(f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage"), 1e-9),
            (Path(f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat"), 1e-6),
            (Path(f"/sys/fs/cgroup/docker/{cid}/cpu.stat"), 1e-6),
        ]
        for path, scale in candidates:
            try:
                text = path.read_text()
            except OSError:
                continue
            if path.name == "cpu.stat":
                text = next((line.split()[1] for line in text.splitlines() if line.startswith("usage_usec")), "")
            if text.strip().isdigit():
                return int(text.strip()) * scale
        return None

    def pause(self) -> None:
        _docker("pause", self.container_id)

    def unpause(self) -> None:
        _docker("unpause", self.container_id)

    def wait_ssh(self, timeout: float = 30) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.address, 22), timeout=1) as sock:
                    if sock.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                logs = _docker("logs", self.container_id, check=False)
                raise TimeoutError(f"sshd on {self.address} did not answer:\n{logs.stdout}{logs.stderr}")
            time.sleep(0.1)

    def stop(self) -> None:
        try:
            self.container.stop()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - the engine refused: remove it by name
            _docker("rm", "-f", "-v", self.container_id, check=False)


LABEL = "rbee-fleet.test-host-address"


def remove_stale(address: str) -> None:
    """Remove a test host left on ``address`` by an earlier run that died before its teardown."""
    found = _docker("ps", "-aq", "--filter", f"label={LABEL}={address}", check=False).stdout.split()
    if found:
        _docker("rm", "-f", "-v", *found, check=False)


def start_host(name: str, address: str, authorized_key: str, image: str = IMAGE) -> TestHost:
    """Start a host. Its /home is a volume of its own (plain ext4, as on a real machine, rather than the
    container's overlay filesystem, which made unpacking a venv take twice the CPU); removed with it."""
    from docker.types import Mount
    from testcontainers.core.container import DockerContainer

    remove_stale(address)
    entry = _ENTRY.replace("{user}", HOST_USER)
    container = (
        DockerContainer(image)
        .with_name(f"rbee-test-{name}-{os.getpid()}")
        .with_env("AUTHORIZED_KEY", authorized_key)
        .with_env("SSH_ADDRESS", address)
        .with_command(["/bin/bash", "-c", entry])
        .with_kwargs(network_mode="host", init=True, labels={LABEL: address},
                     mounts=[Mount(target="/home", source=None, type="volume")])
    )
    container.start()
    host = TestHost(name=name, address=address, container=container)
    host.wait_ssh()
    return host
