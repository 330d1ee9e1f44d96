"""Downloads against a real HTTP server on loopback that lies about sizes: refused before writing, or stopped."""

from __future__ import annotations

import shutil
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.jobs import JobClient
from rbee_fleet.contracts.fleet import ModelDownloadOp
from rbee_fleet.hive import disk_guard
from rbee_fleet.hive.catalog import Catalog
from tests.hive.test_catalog import run_download
from tests.support import procs
from tests.support.hf_standin import HubStandIn, ServedHub

TIB = 2**40


class LyingServer:
    """Files whose HEAD and GET declare sizes that are not what they send."""

    def __init__(self) -> None:
        self.bytes_sent: dict[str, int] = {}

    async def huge(self, request: web.Request) -> web.StreamResponse:
        """Declares 1 TiB (HEAD and GET) and would send it slowly."""
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = TIB
        await resp.prepare(request)
        if request.method == "GET":
            self.bytes_sent["huge"] = 0
            for _ in range(1000):
                await resp.write(b"\0" * 65536)
                self.bytes_sent["huge"] += 65536
        return resp

    async def huge_get_only(self, request: web.Request) -> web.StreamResponse:
        """No size on HEAD; the GET declares 1 TiB."""
        if request.method == "HEAD":
            return web.Response(status=405)
        return await self.huge(request)

    async def overflowing(self, request: web.Request) -> web.StreamResponse:
        """HEAD declares 1000 bytes; the GET (chunked, no length) sends 64 KiB."""
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": "1000", "Content-Type": "application/octet-stream"})
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b"x" * 1024)
        await resp.write_eof()
        return resp


@pytest.fixture
async def liar():
    server = LyingServer()
    app = web.Application()
    for name in ("huge", "huge_get_only", "overflowing"):
        handler = getattr(server, name)
        app.router.add_route("GET", f"/{name}.gguf", handler)
        app.router.add_route("HEAD", f"/{name}.gguf", handler)
    http = TestServer(app, host="127.0.0.1")
    await http.start_server()
    yield server, str(http.make_url(""))
    await http.close()


def only_catalog_dir_left(root: Path) -> bool:
    """Nothing at all under the catalog: no model, no half-written staging directory."""
    return list(root.rglob("*")) == []


@pytest.mark.parametrize("name", ["huge", "huge_get_only"])
async def test_a_declared_size_beyond_free_space_is_refused_before_writing(tmp_path, liar, name):
    server, url = liar
    catalog = Catalog(tmp_path / "models")
    free = shutil.disk_usage(tmp_path).free
    assert free < TIB, "this test needs a disk with less than 1 TiB free"
    with pytest.raises(OperationFailed) as info:
        await run_download(catalog, f"{url}/{name}.gguf")
    message = str(info.value)
    assert "refusing to download 1.0 TiB" in message and "free on the disk" in message and "nothing was written" in message
    assert only_catalog_dir_left(tmp_path / "models")
    if name == "huge":
        assert "huge" not in server.bytes_sent  # refused on HEAD's word: the GET never came


async def test_a_body_running_past_its_declared_length_is_stopped(tmp_path, liar):
    _, url = liar
    catalog = Catalog(tmp_path / "models")
    with pytest.raises(OperationFailed, match="sent more than the 1000 bytes it declared"):
        await run_download(catalog, f"{url}/overflowing.gguf")
    assert only_catalog_dir_left(tmp_path / "models")


def test_the_margin_is_kept(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    disk_guard.require_room(free - disk_guard.MARGIN_BYTES - 2**20, tmp_path, "fits")
    with pytest.raises(OperationFailed, match="always kept free"):
        disk_guard.require_room(free - disk_guard.MARGIN_BYTES + 2**20, tmp_path, "does not fit")


async def test_the_job_error_says_why_through_a_real_queen(tmp_path, liar):
    _, url = liar
    port = procs.free_port()
    inv = procs.write_inventory(tmp_path / "inv.toml", port=port, worker_port_base=procs.free_port_range(4), workers=[])
    queen = procs.start_queen(tmp_path, inv, tmp_path / "home", port)
    try:
        async with aiohttp.ClientSession() as session:
            jobs = JobClient(session, queen.url, procs.admin_headers(tmp_path / "home"))
            with pytest.raises(OperationFailed) as info:
                await jobs.run(ModelDownloadOp(source=f"{url}/huge.gguf"))
        assert "refusing to download 1.0 TiB" in str(info.value)
        assert not [p for p in (tmp_path / "home" / "models").iterdir() if p.name.startswith(".tmp")]
    finally:
        queen.stop()


def test_a_hub_listing_sizes_beyond_free_space_is_refused_before_writing(tmp_path):
    """The Hugging Face hub (a stand-in on loopback) lists a 1 TiB file: the job fails before any download."""
    hub = HubStandIn({"someone/huge-GGUF": {"main": {"huge.gguf": b"GGUF" + b"\0" * 4096}}},
                     declared={"huge.gguf": TIB})
    with ServedHub(hub) as served:
        port = procs.free_port()
        inv = procs.write_inventory(tmp_path / "inv.toml", port=port, worker_port_base=procs.free_port_range(4),
                                    workers=[])
        env = {"HF_ENDPOINT": served.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        queen = procs.start_queen(tmp_path, inv, tmp_path / "home", port, env=env)
        try:
            status, body, _ = procs.http_json(f"{queen.url}/v1/jobs", method="POST",
                                              body={"operation": {"kind": "model_download",
                                                                  "source": "hf:someone/huge-GGUF/huge.gguf"}},
                                              headers=procs.admin_headers(tmp_path / "home"))
            assert status == 202
            def ended() -> dict | None:
                job = procs.http_json(f"{queen.url}/v1/jobs/{body['job_id']}")[1]
                return job if job["state"] != "running" else None

            job = procs.wait_until(ended, 60, what="the download job to end")
        finally:
            queen.stop()
    assert job["state"] == "failed" and "refusing to download 1.0 TiB" in job["error"], job
    assert not any("/resolve/" in r and r.startswith("GET") for r in served.requests)  # no file was fetched
    assert not [p for p in (tmp_path / "home" / "models").iterdir() if p.name.startswith(".tmp")]
