"""The hive's model catalog: built-in alias, copies from a path, downloads over HTTP, deletes, failures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from rbee_fleet.common.errors import Conflict, ModelNotFound, OperationFailed
from rbee_fleet.common.jobs import JobRegistry
from rbee_fleet.hive.catalog import Catalog, HfSource


async def run_download(catalog: Catalog, source: str, name: str | None = None):
    """Run a download as a real job, returning (entry, changed, events)."""
    registry = JobRegistry()
    outcome = {}

    async def op(emit):
        outcome["entry"], outcome["changed"] = await catalog.download(source, name, emit)
        return {}

    job = registry.submit({"kind": "model_download", "source": source}, op)
    await job.wait()
    if job.error:
        raise OperationFailed(job.error)
    return outcome["entry"], outcome["changed"], job.events


def test_builtin_alias_is_listed_and_protected(tmp_path, model_path):
    catalog = Catalog(tmp_path / "models")
    entries = {e.id: e for e in catalog.list()}
    assert entries["smollm2"].builtin and entries["smollm2"].path == model_path
    assert entries["smollm2"].format == "gguf" and entries["smollm2"].size_bytes == 98_362_432
    with pytest.raises(Conflict):
        catalog.delete("smollm2")
    with pytest.raises(ModelNotFound) as info:
        catalog.get("missing")
    assert "rbee-keeper model download" in info.value.message


async def test_copy_from_a_local_path_reports_progress(tmp_path, model_path):
    catalog = Catalog(tmp_path / "models")
    entry, changed, events = await run_download(catalog, model_path, "copy")
    assert changed and entry.id == "copy" and entry.format == "gguf"
    assert Path(entry.path).stat().st_size == 98_362_432
    progress = [e.progress for e in events if e.progress is not None]
    assert progress[-1].current == progress[-1].total == 98_362_432 and progress[-1].unit == "bytes"
    assert catalog.get("copy").path == entry.path
    again = await run_download(catalog, model_path, "copy")
    assert again[1] is False  # same source, same name: nothing to do
    with pytest.raises(OperationFailed, match="already exists"):
        await run_download(catalog, str(tmp_path), "copy")
    catalog.delete("copy")
    assert not (tmp_path / "models" / "copy").exists()


@pytest.fixture
async def file_server(model_path):
    """A real HTTP server on loopback serving the model file (and a 404)."""
    async def serve_file(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(model_path)

    app = web.Application()
    app.router.add_get("/files/smol.gguf", serve_file)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/files"))
    await server.close()


async def test_download_over_http(tmp_path, file_server):
    catalog = Catalog(tmp_path / "models")
    entry, changed, events = await run_download(catalog, f"{file_server}/smol.gguf")
    assert changed and entry.id == "smol" and entry.format == "gguf" and entry.size_bytes == 98_362_432
    last = [e.progress for e in events if e.progress is not None][-1]
    assert last.total == 98_362_432 and last.current == 98_362_432


async def test_failed_download_leaves_nothing_behind(tmp_path, file_server):
    catalog = Catalog(tmp_path / "models")
    with pytest.raises(OperationFailed, match="HTTP 404"):
        await run_download(catalog, f"{file_server}/missing.gguf")
    assert [p.name for p in (tmp_path / "models").iterdir()] == []
    with pytest.raises(OperationFailed, match="invalid model name"):
        await run_download(catalog, f"{file_server}/smol.gguf", "../escape")


async def test_a_url_cannot_place_its_file_outside_the_catalog(tmp_path, file_server):
    """An encoded '../' in the URL's last segment names nothing but a file inside the download."""
    catalog = Catalog(tmp_path / "models")
    with pytest.raises(OperationFailed):
        await run_download(catalog, f"{file_server}/..%2F..%2F..%2Fplanted.txt", "innocent")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["models"]
    with pytest.raises(OperationFailed, match="refusing the file name"):
        await run_download(catalog, f"{file_server}/%2E%2Ebashrc", "innocent")


async def test_cancelled_download_leaves_nothing_behind(tmp_path):
    """A server that trickles bytes, so the download is surely in flight when it is cancelled."""
    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(64 * 2**20)})
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b"\0" * 2**20)
            await asyncio.sleep(0.1)
        return resp

    app = web.Application()
    app.router.add_get("/slow.gguf", trickle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        catalog = Catalog(tmp_path / "models")
        registry = JobRegistry()

        async def op(emit):
            await catalog.download(str(server.make_url("/slow.gguf")), None, emit)
            return {}

        job = registry.submit({"kind": "model_download"}, op)
        for _ in range(50):
            await asyncio.sleep(0.1)
            if any(e.progress and e.progress.current > 0 for e in job.events):
                break
        assert list((tmp_path / "models").iterdir()), "the download should be staged while in flight"
        await registry.cancel(job.id)
        assert job.state.value == "cancelled"
        assert list((tmp_path / "models").iterdir()) == []
    finally:
        await server.close()


def test_hf_source_syntax():
    assert HfSource.parse("hf:bartowski/SmolLM2-GGUF/SmolLM2-Q4.gguf@main") == HfSource("bartowski/SmolLM2-GGUF", "SmolLM2-Q4.gguf", "main")
    assert HfSource.parse("hf:turboderp/Llama-3-8B-exl2@6.0bpw").default_name() == "Llama-3-8B-exl2-6.0bpw"
    assert HfSource.parse("hf:a/b/sub/file.gguf").default_name() == "file"
    with pytest.raises(OperationFailed):
        HfSource.parse("hf:justonepart")
    for bad in ("hf:a/b/../../../etc/passwd", "hf:../b/file.gguf", "hf:a/b//x.gguf"):
        with pytest.raises(OperationFailed):
            HfSource.parse(bad)
