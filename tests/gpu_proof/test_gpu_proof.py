"""The GPU proof's parts that need no GPU: arguments, time limits, the report, the environment of its
children, the fleet driver against a real queen and llama.cpp worker, and the whole proof run here, where
it must fail the CUDA checks, say why, and still write its report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.gpu_proof import fleet, proof
from tests.gpu_proof.report import Check, Report, tail

REPO = Path(__file__).resolve().parents[2]


# -- arguments, deadlines, children ------------------------------------------------------------------


def test_arguments_have_working_defaults_and_refuse_nonsense(capsys: pytest.CaptureFixture[str]) -> None:
    args = proof.parse_args(["--out", "OUT"])
    assert (args.kit, args.work, args.budget_s, args.ctx, args.max_tokens, args.concurrent) == (
        ".gpu-kit", "/tmp/rbee-gpu-proof", 540.0, 4096, 128, 8)
    assert args.python == sys.executable
    for bad in (["--out", "o", "--runs", "0"], ["--out", "o", "--ctx", "256", "--max-tokens", "250"], []):
        with pytest.raises(SystemExit) as exc:
            proof.parse_args(bad)
        assert exc.value.code == 2
    assert "--max-tokens must leave room" in capsys.readouterr().err


def test_a_deadline_shortens_steps_and_refuses_them_when_spent() -> None:
    deadline = proof.Deadline(100.0)
    assert deadline.timeout(30) == 30
    assert 70 < deadline.timeout(500) <= 100 - proof.RESERVE_S
    spent = proof.Deadline(proof.RESERVE_S + 2)
    with pytest.raises(proof.NotRun, match="budget is spent"):
        spent.timeout(10)


def test_a_child_past_its_limit_is_killed_with_its_children(tmp_path: Path) -> None:
    marker = tmp_path / "grandchild-ran"
    code = f"import subprocess, time; subprocess.Popen(['sh', '-c', 'sleep 3; touch {marker}']); time.sleep(60)"
    started = time.monotonic()
    child = proof.run_child([sys.executable, "-c", code], timeout=1.0, log=tmp_path / "log")
    assert child.returncode is None and time.monotonic() - started < 10
    with pytest.raises(RuntimeError, match="timed out"):
        child.json()
    time.sleep(3.5)
    assert not marker.exists()  # the whole process group went
    assert "--- exit None" in (tmp_path / "log").read_text()


def test_a_childs_answer_is_its_last_json_line() -> None:
    code = "print('compiling...'); print('\\x1b[?25h{\"ok\": 1}'); print('{not json')"
    child = proof.run_child([sys.executable, "-c", code], timeout=30)
    assert child.json() == {"ok": 1}
    failed = proof.run_child([sys.executable, "-c", "import sys; print('x'); sys.exit('the build broke: nvcc error')"], timeout=30)
    with pytest.raises(RuntimeError, match="exit status 1: the build broke: nvcc error"):
        failed.json()


def test_cuda_home_is_the_toolkit_not_a_wrapper_scripts_folder(tmp_path: Path) -> None:
    """A ``/usr/local/bin/nvcc`` wrapper must not make ``/usr/local`` the CUDA home (no headers there)."""
    wrapper_bin = tmp_path / "local" / "bin"
    wrapper_bin.mkdir(parents=True)
    (wrapper_bin / "nvcc").write_text("#!/bin/sh\nexec /elsewhere/nvcc \"$@\"\n")
    (wrapper_bin / "nvcc").chmod(0o755)
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").write_text("")
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    python = str(tmp_path / "venv" / "bin" / "python3")
    env = {"PATH": str(wrapper_bin), "CUDA_HOME": str(toolkit)}
    assert proof.find_cuda_home(python, env) == str(toolkit)
    assert proof.find_cuda_home(python, {"PATH": str(wrapper_bin)}, roots=[str(toolkit)]) == str(toolkit)
    assert proof.find_cuda_home(python, {"PATH": str(wrapper_bin)}, roots=[]) is None


def test_children_get_the_kit_first_and_build_inside_the_work_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_INVENTORY", "/somewhere/else.toml")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    env = proof.child_env("/opt/py/bin/python3", tmp_path / "site", tmp_path, "/usr/local/cuda-13.0", "9.0",
                          includes=["/opt/py/nvidia/cu13/include"])
    assert env["PYTHONPATH"] == str(tmp_path / "site")
    assert env["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "torch_extensions")
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and env["CUDA_HOME"] == "/usr/local/cuda-13.0"
    assert env["PATH"].split(os.pathsep)[:3] == ["/opt/py/bin", str(tmp_path / "site" / "bin"), "/usr/local/cuda-13.0/bin"]
    assert env["CPLUS_INCLUDE_PATH"].split(os.pathsep)[-1] == "/opt/py/nvidia/cu13/include"
    assert env["RBEE_HOME"] == str(tmp_path / "home") and "RBEE_INVENTORY" not in env


# -- the report --------------------------------------------------------------------------------------


def test_the_report_is_json_and_text_and_fails_when_one_check_does(tmp_path: Path) -> None:
    report = Report()
    assert not report.ok  # nothing checked proves nothing
    report.environment["nvidia-smi"] = "NVIDIA H200, 580.159.04, 143771 MiB, 9.0"
    report.versions["torch"] = "2.11.0+cu130"
    report.timings["extension_build_s"] = 212.4
    report.add(Check("exllamav2 extension builds", True, "loaded after 212.4 s", 212.4, {"objects": 47}))
    report.write(tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["ok"] is True
    report.add(Check("8 concurrent streams", False, "3 of 8 concurrent streams failed", 4.2))
    report.finished = time.time()
    report.write(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["ok"] is False and data["finished"] and len(data["checks"]) == 2
    assert data["checks"][0] == {"name": "exllamav2 extension builds", "ok": True, "detail": "loaded after 212.4 s",
                                 "seconds": 212.4, "data": {"objects": 47}}
    text = (tmp_path / "report.txt").read_text()
    assert text.startswith("rbee-fleet GPU proof: FAIL (1 of 2 checks passed), finished")
    assert "[FAIL] 8 concurrent streams (4.2 s): 3 of 8 concurrent streams failed" in text
    assert "nvidia-smi: NVIDIA H200" in text and "extension_build_s: 212.4" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.txt"]  # no temporary files left


def test_a_log_tail_says_what_it_left_out(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    log.write_text("a" * 100 + "the end\n")
    assert tail(log, 1000) == "a" * 100 + "the end\n"
    assert tail(log, 8) == "(first 100 bytes left out)\nthe end\n"
    assert "No such file" in tail(tmp_path / "missing.log", 10)


# -- the fleet driver, against a real queen and a llama.cpp worker -------------------------------------


@pytest.mark.slow
async def test_the_fleet_driver_against_a_real_queen_and_cpu_worker(tmp_path: Path, model_path: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBEE_")}
    queen = fleet.start_queen([sys.executable, "-m", "rbee_fleet.queen"], tmp_path, env)
    try:
        async with aiohttp.ClientSession() as session:
            await fleet.wait_healthy(session, queen, 120)  # a busy 2-core machine starts Python slowly
            got = await fleet.run_job(session, queen, {"kind": "model_download", "source": model_path, "name": "kit-tiny"})
            assert got["model"]["format"] == "gguf"
            with pytest.raises(fleet.FleetError, match="job worker_spawn failed: .*no-such-model"):
                await fleet.run_job(session, queen, {"kind": "worker_spawn", "model": "no-such-model"})
            got = await fleet.run_job(session, queen, {"kind": "worker_spawn", "model": "kit-tiny", "device": "cpu",
                                                       "ctx_size": 512, "threads": 1, "max_queue": 4})
            assert got["worker"]["backend"] == "llamacpp"
            assert (await fleet.wait_ready(session, queen, 30))["state"] == "ready"

            single = await fleet.single_streams(session, queen, runs=1, max_tokens=6)
            assert single.ok, single.detail
            [run] = single.data["runs"]
            assert run["completion_tokens"] == 6 and run["finish_reason"] == "length" and run["ttft_ms"] > 0

            many = await fleet.concurrent_streams(session, queen, 2, 4)
            assert many.ok, many.detail
            assert many.data["tokens"] == 8 and len(many.data["ttft_ms"]) == 2
            assert ("batch 1" in many.data["mode"]) == (many.data["slots_total"] == 1)

            cut = await fleet.cancel_mid_stream(session, queen, 400)
            hb = await fleet.heartbeat(session, queen)
            if hb.get("cache_tokens_total") and hb.get("cache_tokens_free") is not None:
                assert cut.ok, cut.detail
            else:  # a CPU worker may report no free cache: the check says so instead of passing on nothing
                assert not cut.ok and "reports no cache figures (llamacpp backend)" in cut.detail

            answer = await fleet.chat(session, queen, max_tokens=300, content="Count from 1 to 500.", cut_after=3)
            assert answer.cut and answer.content_chunks == 3 and answer.status == 200

            overflow = await fleet.context_overflow(session, queen)
            assert overflow.ok, overflow.detail
            assert overflow.data["status"] == 400 and overflow.data["max_tokens"] == (hb.get("cache_tokens_total") or 512)
    finally:
        queen.stop()
    assert queen.process.poll() is not None


# -- the whole proof, here, without a GPU --------------------------------------------------------------


@pytest.mark.slow
def test_the_proof_without_a_gpu_fails_its_cuda_checks_and_still_reports(tmp_path: Path) -> None:
    from tests.gpu_proof import kit as kit_builder

    kit = tmp_path / "kit"
    kit_builder.build(kit, kit_builder.default_cache(), log=lambda line: None)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tests" / "gpu_proof" / "proof.py"), "--kit", str(kit), "--out", str(out),
           "--work", str(tmp_path / "work"), "--budget-s", "200"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is False and report["finished"]
    assert checks["kit matches its manifest"]["ok"]
    gpu = checks["CUDA GPU visible to torch"]
    assert not gpu["ok"] and "sees no GPU" in gpu["detail"]
    installed = checks["wheels install offline into a private directory"]
    if sys.version_info[:2] == (3, 12):
        assert installed["ok"]
    else:  # the kit is for CPython 3.12: pip refuses its compiled wheels on this Python, and says so
        assert not installed["ok"] and "is not a supported wheel" in installed["detail"]
    for name in ("exllamav2 extension builds", "exllamav2's own generator (baseline)", "queen starts",
                 "exllamav2 worker spawned through the queen", "8 concurrent streams", "queen vs exllamav2 directly"):
        assert not checks[name]["ok"] and checks[name]["detail"].startswith("not run: needs"), name
    text = (out / "report.txt").read_text()
    assert text.startswith("rbee-fleet GPU proof: FAIL") and "[pass] kit matches its manifest" in text
    assert report["versions"]["rbee-fleet (kit)"].startswith("0.")
    assert set(os.listdir(out)) <= {"report.json", "report.txt", "build.log", "direct.log", "queen.log", "worker.log"}
