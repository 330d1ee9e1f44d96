"""The hive service: device probes stay off the event loop (a slow nvidia-smi must not stall the queen)."""

from __future__ import annotations

import asyncio
import threading

import aiohttp

from rbee_fleet.common.paths import Layout
from rbee_fleet.hive import devices, service
from rbee_fleet.hive.service import HiveService, HiveSettings


async def test_device_probes_never_run_on_the_event_loop(tmp_path, monkeypatch):
    loop_thread = threading.current_thread()
    probed_on: list[threading.Thread] = []
    real_detect, real_engine = devices.detect, devices.probe_engine
    engine_on: list[threading.Thread] = []

    def recording_detect(engine=None):  # the real probe, noting the thread it runs on
        probed_on.append(threading.current_thread())
        return real_detect(engine)

    def recording_engine(env=None):  # llama-server --list-devices: a process start, never on the loop either
        engine_on.append(threading.current_thread())
        return real_engine(env)

    monkeypatch.setattr(devices, "detect", recording_detect)
    monkeypatch.setattr(devices, "probe_engine", recording_engine)
    monkeypatch.setattr(service, "DEVICE_REFRESH_S", 0.05)
    async with aiohttp.ClientSession() as session:
        hive = HiveService(HiveSettings(hive_id="t", layout=Layout(tmp_path / "home")), session)
        await hive.start()
        for _ in range(10):
            assert hive.status().devices.cpu.threads >= 1
            await asyncio.sleep(0.03)
        await hive.close()
    assert len(probed_on) >= 3, "the background refresh keeps probing"
    assert all(t is not loop_thread for t in probed_on)
    assert engine_on and all(t is not loop_thread for t in engine_on)
