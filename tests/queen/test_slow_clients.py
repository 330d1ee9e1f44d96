"""Clients that stall, flood or speak broken HTTP, against a real queen: clean 408/429/400s in OpenAI's shape."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.support import procs

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5
MAX_CONNECTIONS = 12


@pytest.fixture
def queen(tmp_path: Path):
    """A queen with short client deadlines and a small per-address cap (no workers: nothing here needs one)."""
    port = procs.free_port()
    extra = (f"header_timeout_s = {HEADER_TIMEOUT_S}\nbody_timeout_s = {BODY_TIMEOUT_S}\n"
             f"max_connections_per_client = {MAX_CONNECTIONS}")
    inv = procs.write_inventory(tmp_path / "inv.toml", port=port, worker_port_base=procs.free_port_range(5),
                                workers=[], queen_extra=extra)
    proc = procs.start_queen(tmp_path, inv, tmp_path / "home", port)
    yield proc
    proc.stop()


def connect(queen: procs.Proc) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(queen.url.rsplit(":", 1)[1])), timeout=10)
    return sock


def read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as a failure)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def parse(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, json.loads(body[: int(headers["content-length"])])


def assert_openai_error(body: dict) -> dict:
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert "param" in err and "code" in err
    return err


def test_stalled_clients_get_408_within_the_deadline_while_others_are_served(queen):
    host = f"127.0.0.1:{queen.url.rsplit(':', 1)[1]}"
    stalled: dict[str, socket.socket] = {}
    stalled["no body"] = connect(queen)
    stalled["no body"].sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                               f"Content-Length: 100\r\n\r\n{{\"model\":".encode())
    stalled["partial headers"] = connect(queen)
    stalled["partial headers"].sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Le".encode())
    stalled["silent"] = connect(queen)
    started = time.monotonic()

    results: dict[str, tuple[float, bytes]] = {}

    def wait_for(name: str, sock: socket.socket) -> None:
        raw = read_all(sock)
        results[name] = (time.monotonic() - started, raw)

    threads = [threading.Thread(target=wait_for, args=item) for item in stalled.items()]
    for t in threads:
        t.start()
    served = []
    while time.monotonic() - started < BODY_TIMEOUT_S + 0.5:  # normal clients, all the while
        t0 = time.monotonic()
        status, body, _ = procs.http_json(f"{queen.url}/v1/models", timeout=5)
        served.append((status, time.monotonic() - t0))
        time.sleep(0.1)
    for t in threads:
        t.join(15)
    for sock in stalled.values():
        sock.close()

    assert served and all(status == 200 for status, _ in served)
    assert max(took for _, took in served) < 1.0, served
    assert set(results) == set(stalled)
    for name, (took, raw) in results.items():
        status, headers, body = parse(raw)
        limit = BODY_TIMEOUT_S if name == "no body" else HEADER_TIMEOUT_S
        assert status == 408, (name, raw)
        assert assert_openai_error(body)["code"] == "request_timeout"
        assert headers.get("connection") == "close"
        assert limit - 0.1 <= took < limit + 1.5, (name, took)  # answered at the deadline, then closed


def test_connections_over_the_per_address_cap_get_429(queen):
    held = [connect(queen) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        extra = connect(queen)
        status, headers, body = parse(read_all(extra))
        extra.close()
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert assert_openai_error(body)["code"] == "too_many_connections"
    finally:
        for sock in held:
            sock.close()
    # Closed connections are counted out: the address is served again.
    procs.wait_until(lambda: procs.http_json(f"{queen.url}/v1/models", timeout=5)[0] == 200, 5, what="service again")


MARKER = "ECHO-ME-NOT-" * 4


@pytest.mark.parametrize("raw", [
    # a lying Content-Length: the rest of the body is read as the next request
    ("POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n"
     + '{"model": "x", "prompt": "' + MARKER * 3000 + '"}'),
    f"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Bad\x01Header: {MARKER}\r\n\r\n",
    f"P{MARKER} /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n",
    f"GET /v1/models HTTP/9.{MARKER}\r\nHost: localhost\r\n\r\n",
    (f"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
     f"zz{MARKER}\r\n{MARKER}\r\n0\r\n\r\n"),
    f"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n{MARKER}",
], ids=["lying-content-length", "bad-header-name", "bad-method", "bad-version", "bad-chunked", "two-lengths"])
def test_malformed_http_is_400_in_openai_shape_without_echo(queen, raw):
    sock = connect(queen)
    sock.sendall(raw.encode())
    data = read_all(sock)
    sock.close()
    assert MARKER.encode() not in data
    # Every response on the connection (the lying length gives two) is a 4xx in OpenAI's shape.
    rest = data
    answered = 0
    while rest:
        status, headers, body = parse(rest)
        assert 400 <= status < 500, rest[:300]
        assert_openai_error(body)
        answered += 1
        rest = rest.partition(b"\r\n\r\n")[2][int(headers["content-length"]):]
    assert answered >= 1
    assert procs.http_json(f"{queen.url}/health")[0] == 200
