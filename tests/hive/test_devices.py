"""GPU detection on nvidia-smi outputs of real cards and on NVML answers (through a named stand-in)."""

from __future__ import annotations

import inspect
import os
import stat
from pathlib import Path

import pytest

from rbee_fleet.hive import devices
from rbee_fleet.hive.devices import GpuProbeError, NoNvidiaDriver
from tests.support import pynvml_standin as nv

FIXTURES = Path(__file__).parents[1] / "fixtures" / "nvidia"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.mark.parametrize("name, expected", [
    ("rtx3090.csv", [(0, "NVIDIA GeForce RTX 3090", 24576, 24237, "8.6", "535.183.01")]),
    ("rtx4090.csv", [(0, "NVIDIA GeForce RTX 4090", 24564, 23011, "8.9", "550.127.05")]),
    ("a100-80gb.csv", [(0, "NVIDIA A100-SXM4-80GB", 81920, 81050, "8.0", "535.129.03")]),
    ("two-gpus.csv", [(0, "NVIDIA GeForce RTX 4090", 24564, 24092, "8.9", "550.54.15"),
                      (1, "NVIDIA GeForce RTX 3060", 12288, 4810, "8.6", "550.54.15")]),
    ("na-fields.csv", [(0, "NVIDIA GeForce RTX 3070 Laptop GPU", 8192, 0, "", "545.29.06")]),
])
def test_parse_recorded_nvidia_smi(name, expected):
    gpus = devices.parse_nvidia_smi_csv(fixture(name))
    got = [(g.index, g.name, g.vram_total_mb, g.vram_free_mb, g.compute_capability, g.driver) for g in gpus]
    assert got == expected
    assert all(g.uuid.startswith("GPU-") and len(g.uuid) == 40 for g in gpus)


def test_parse_rejects_a_garbled_line():
    with pytest.raises(GpuProbeError, match="want 7 fields"):
        devices.parse_nvidia_smi_csv("0, NVIDIA GeForce RTX 3090, 24576\n")


def fake_nvidia_smi(tmp_path: Path, with_cap: tuple[str, int], without_cap: tuple[str, int] | None = None) -> str:
    """A stand-in ``nvidia-smi`` executable printing a recorded output with its exit code."""
    without_cap = without_cap or with_cap
    script = tmp_path / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *compute_cap*) cat "{FIXTURES / with_cap[0]}"; exit {with_cap[1]};;\n'
        f'  *) cat "{FIXTURES / without_cap[0]}"; exit {without_cap[1]};; esac\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_nvidia_smi_two_gpus(tmp_path):
    gpus = devices.gpus_from_nvidia_smi(fake_nvidia_smi(tmp_path, ("two-gpus.csv", 0)))
    assert [g.name for g in gpus] == ["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3060"]


def test_old_driver_is_asked_again_without_compute_cap(tmp_path):
    exe = fake_nvidia_smi(tmp_path, ("old-driver-refusal.txt", 2), ("old-driver.csv", 0))
    [gpu] = devices.gpus_from_nvidia_smi(exe)
    assert (gpu.name, gpu.vram_total_mb, gpu.compute_capability, gpu.driver) == \
        ("NVIDIA GeForce RTX 2080 Ti", 11019, "", "470.182.03")


def test_driver_not_loaded_is_an_error_with_nvidias_words(tmp_path):
    with pytest.raises(GpuProbeError) as info:
        devices.gpus_from_nvidia_smi(fake_nvidia_smi(tmp_path, ("driver-not-loaded.txt", 9)))
    assert "exit 9" in str(info.value) and "couldn't communicate with the NVIDIA driver" in str(info.value)


def test_no_devices_is_no_gpus(tmp_path):
    assert devices.gpus_from_nvidia_smi(fake_nvidia_smi(tmp_path, ("no-devices.txt", 6))) == []


def test_no_nvidia_smi_means_no_driver(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(NoNvidiaDriver):
        devices.gpus_from_nvidia_smi()


def test_nvml_reads_every_field():
    standin = nv.NvmlStandIn([nv.A100_80GB, nv.RTX_3090], driver=b"535.129.03")
    gpus = devices.gpus_from_nvml(standin.module())
    assert [(g.index, g.name, g.uuid, g.vram_total_mb, g.vram_free_mb, g.compute_capability, g.driver) for g in gpus] == [
        (0, "NVIDIA A100-SXM4-80GB", nv.A100_80GB.uuid, 81920, 81050, "8.0", "535.129.03"),
        (1, "NVIDIA GeForce RTX 3090", nv.RTX_3090.uuid, 24576, 24237, "8.6", "535.129.03"),
    ]
    assert standin.calls == ["init", "shutdown"] and not standin.open


def test_nvml_keeps_the_gpus_that_answer():
    lost = nv.Card(**{**nv.RTX_4090.__dict__, "lost": True})
    gpus = devices.gpus_from_nvml(nv.NvmlStandIn([lost, nv.RTX_3090]).module())
    assert [(g.index, g.name) for g in gpus] == [(1, "NVIDIA GeForce RTX 3090")]
    with pytest.raises(GpuProbeError, match="GPU 0: GPU is lost"):
        devices.gpus_from_nvml(nv.NvmlStandIn([lost]).module())


def test_nvml_without_library_is_no_driver_and_a_dead_driver_is_an_error():
    with pytest.raises(NoNvidiaDriver):
        devices.gpus_from_nvml(nv.NvmlStandIn([], init_error=nv.NVML_ERROR_LIBRARY_NOT_FOUND).module())
    with pytest.raises(GpuProbeError, match="Driver Not Loaded"):
        devices.gpus_from_nvml(nv.NvmlStandIn([], init_error=nv.NVML_ERROR_DRIVER_NOT_LOADED).module())


def test_the_real_nvml_on_this_machine_says_no_driver():
    """The real nvidia-ml-py, on a machine without an NVIDIA driver, is 'no GPU', not an error."""
    import pynvml  # nvidia-ml-py, installed by `just setup-test`

    if not os.path.exists("/dev/nvidiactl"):  # no NVIDIA kernel driver here
        with pytest.raises(NoNvidiaDriver):
            devices.gpus_from_nvml(pynvml)
        return
    gpus = devices.gpus_from_nvml(pynvml)
    assert gpus and all(g.vram_total_mb > 0 for g in gpus)  # a machine with a GPU: it was found


def test_standin_matches_the_real_nvml_api():
    import pynvml  # nvidia-ml-py, installed by `just setup-test`

    module = nv.NvmlStandIn([]).module()
    for name in dir(module):
        if name.startswith("nvml"):
            real = inspect.signature(getattr(pynvml, name))
            ours = inspect.signature(getattr(module, name))
            assert list(real.parameters) == list(ours.parameters), name
    assert pynvml.NVML_ERROR_LIBRARY_NOT_FOUND == nv.NVML_ERROR_LIBRARY_NOT_FOUND
    assert pynvml.NVML_ERROR_DRIVER_NOT_LOADED == nv.NVML_ERROR_DRIVER_NOT_LOADED


def test_detect_falls_back_to_nvidia_smi_and_reports_half_drivers(tmp_path):
    broken_nvml = lambda: devices.gpus_from_nvml(nv.NvmlStandIn([], init_error=nv.NVML_ERROR_DRIVER_NOT_LOADED).module())  # noqa: E731
    smi = lambda: devices.gpus_from_nvidia_smi(fake_nvidia_smi(tmp_path, ("rtx4090.csv", 0)))  # noqa: E731
    gpus, error = devices.detect_gpus((broken_nvml, smi))
    assert [g.name for g in gpus] == ["NVIDIA GeForce RTX 4090"] and error is None

    dead = lambda: devices.gpus_from_nvidia_smi(fake_nvidia_smi(tmp_path, ("driver-not-loaded.txt", 9)))  # noqa: E731
    gpus, error = devices.detect_gpus((broken_nvml, dead))
    assert gpus == [] and "Driver Not Loaded" in error and "couldn't communicate" in error

    nothing = lambda: devices.gpus_from_nvml(nv.NvmlStandIn([], init_error=nv.NVML_ERROR_LIBRARY_NOT_FOUND).module())  # noqa: E731
    no_smi = lambda: (_ for _ in ()).throw(NoNvidiaDriver("no nvidia-smi"))  # noqa: E731
    assert devices.detect_gpus((nothing, no_smi)) == ([], None)  # a CPU-only machine: no GPU, no error


def test_detect_on_this_machine_never_raises():
    info = devices.detect()
    assert info.cpu.cores >= 1 and info.cpu.ram_total_mb > 0


def test_visible_devices_pins_by_uuid():
    gpus = devices.parse_nvidia_smi_csv(fixture("two-gpus.csv"))
    assert devices.visible_devices("cuda:1", gpus) == "GPU-7d95b3a1-46e0-c2f8-19db-5a03e8c7f164"
    assert devices.visible_devices("cuda:0,1", gpus).count("GPU-") == 2
    assert devices.visible_devices("cuda:3", gpus) == "3"  # unknown GPU: the index as given
