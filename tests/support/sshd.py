"""A real OpenSSH server (Debian's ``sshd``) in the foreground on a loopback port.

For the connection, host-key, probe and TUI-dialog tests; the end-to-end deploys use whole test hosts
in containers (tests/ssh). It lets in the user running the tests with a key the test made, and runs
commands in that user's real shell on this machine: tests point every install directory into their
own temporary folder.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh

from tests.support.procs import free_port, port_open

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
USER = getpass.getuser()  # the only account a test's sshd may log in

CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {authorized_keys}
PidFile none
UsePAM no
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers {user}
AllowTcpForwarding yes
LogLevel VERBOSE
"""


def write_client_key(path: Path) -> Path:
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(path))
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def openssh_server(client_key: Path, workdir: Path) -> Iterator[tuple[asyncssh.SSHKey, int]]:
    """Run sshd on 127.0.0.1 letting ``client_key`` in as :data:`USER`; yields (its host key, its port)."""
    if not os.access(SSHD, os.X_OK):
        raise RuntimeError(f"{SSHD} is missing: install Debian's openssh-server (.ci/run does)")
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key_file = workdir / "ssh_host_ed25519_key"
    host_key.write_private_key(str(host_key_file))
    host_key_file.chmod(0o600)
    authorized = workdir / "authorized_keys"
    authorized.write_text(asyncssh.read_private_key(str(client_key)).export_public_key().decode())
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text(CONFIG.format(port=port, host_key=host_key_file, authorized_keys=authorized, user=USER))
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    log = workdir / "sshd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start on 127.0.0.1:{port}:\n{log.read_text()}")
            time.sleep(0.01)
        yield host_key, port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
