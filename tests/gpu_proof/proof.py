"""The GPU proof: rbee-fleet's exllamav2 path run for real on an NVIDIA GPU, offline, in one short run.

    python3 tests/gpu_proof/proof.py --kit .gpu-kit --out OUT        (from the checkout; `just gpu-proof OUT`)

Needs only the machine's own python3 (torch with CUDA, aiohttp) and the kit that ``just gpu-kit`` built.
In order, each step with its own time limit: check the kit against its manifest; read the GPU, driver and
versions; install the kit's wheels into a private directory (``--work``/site; nothing touches the system's
packages); import them; build exllamav2's CUDA extension (JIT, timed; build folder inside ``--work``);
``rbee-hive --check``; exllamav2's own dynamic generator driven directly on the kit's model (the
baseline); then real processes: ``queen-rbee`` with its embedded hive, an exllamav2 worker spawned through
the job API, one chat stream, 8 concurrent streams, a stream cut mid-way (its cache must come back), and a
request that cannot fit the cache (400). ``OUT/report.json`` and ``OUT/report.txt`` are rewritten after
every step; the logs go beside them. Exit status 0 only when every check passed.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import this folder's modules through the checkout's root
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import asyncio
import glob
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tests.gpu_proof.manifest import verify
from tests.gpu_proof.report import Check, Report, tail

HERE = Path(__file__).resolve().parent
LOG_LIMIT = 4 * 2**20  # bytes of each log copied into OUT (the device tool returns 16 MiB a file)
RESERVE_S = 25.0  # kept back from every step for stopping processes and writing the report


class NotRun(Exception):
    """A step that could not start: a step it needs failed, or the time is spent."""


@dataclass
class Deadline:
    total_s: float
    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = self.started or time.monotonic()

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.started)

    def timeout(self, want: float) -> float:
        """``want`` seconds, or what is left before the reserve; ``NotRun`` when that is under 5 s."""
        got = min(want, self.left() - RESERVE_S)
        if got < 5:
            raise NotRun(f"not run: the proof's {self.total_s:.0f} s budget is spent")
        return got


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu-proof", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kit", default=".gpu-kit", help="the kit folder `just gpu-kit` wrote (default .gpu-kit)")
    p.add_argument("--out", required=True, help="folder for report.json, report.txt and the logs")
    p.add_argument("--work", default="/tmp/rbee-gpu-proof",
                   help="private install, extension build and fleet state (default /tmp/rbee-gpu-proof; "
                        "a rerun there reuses the built extension)")
    p.add_argument("--budget-s", type=float, default=540.0, help="the whole proof's time limit (default 540)")
    p.add_argument("--python", default=sys.executable, help="the Python with CUDA torch (default: this one)")
    p.add_argument("--ctx", type=int, default=4096, help="worker context and cache tokens (default 4096)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per timed answer (default 128)")
    p.add_argument("--runs", type=int, default=3, help="timed single answers, each way (default 3)")
    p.add_argument("--concurrent", type=int, default=8, help="concurrent streams (default 8)")
    args = p.parse_args(argv)
    for name in ("ctx", "max_tokens", "runs", "concurrent"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_tokens + 64 > args.ctx:
        p.error("--max-tokens must leave room for the prompt within --ctx")
    return args


# -- child processes ---------------------------------------------------------------------------------


@dataclass
class Child:
    returncode: int | None  # None: killed at its time limit
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> dict[str, Any]:
        """The JSON object a probe printed last (on a line of its own, perhaps after a progress bar's escapes)."""
        if self.returncode == 0:
            for line in reversed(self.stdout.splitlines()):
                start = line.find("{")
                if start >= 0:
                    try:
                        return json.loads(line[start:])
                    except ValueError:
                        continue
        why = "timed out" if self.returncode is None else f"exit status {self.returncode}"
        raise RuntimeError(f"{why}: {last_lines(self.stderr or self.stdout, 12)}")


def last_lines(text: str, n: int) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-n:])


def run_child(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None,
              log: Path | None = None) -> Child:
    """Run ``cmd`` in its own session; at ``timeout`` kill its whole process group."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=cwd, start_new_session=True, text=True, errors="replace")
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code = None
    if log is not None:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"$ {' '.join(cmd)}\n{out}{err}\n--- exit {code} after {time.monotonic() - started:.1f} s\n")
    return Child(code, out, err, time.monotonic() - started)


CUDA_ROOTS = ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True))


def find_cuda_home(python: str, environ: dict[str, str] | None = None, roots: list[str] | tuple[str, ...] = CUDA_ROOTS) -> str | None:
    """The CUDA toolkit: $CUDA_HOME or $CUDA_PATH, /usr/local/cuda*, nvcc's on PATH, or NVIDIA's pip packages.

    Only a folder with both ``bin/nvcc`` and ``include/cuda_runtime.h`` counts: torch guesses the folder
    above the first nvcc on PATH, which on some images is a wrapper script in /usr/local/bin.
    """
    environ = os.environ if environ is None else environ
    candidates = [environ.get("CUDA_HOME"), environ.get("CUDA_PATH"), *roots]
    nvcc = shutil.which("nvcc", path=environ.get("PATH", ""))
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    prefix = Path(python).parents[1]
    candidates += sorted(str(Path(p).parents[1]) for p in glob.glob(str(prefix / "lib/python3*/site-packages/nvidia/*/bin/nvcc")))
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").is_file() and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return home
    return None


def child_env(python: str, site: Path, work: Path, cuda_home: str | None, arch: str | None,
              includes: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """The environment of every child: the kit's site first, the extension built inside ``work``.

    ``includes`` are the header folders of NVIDIA's pip packages beside torch (cuBLAS, cuSPARSE, cuRAND):
    torch's ``ATen/cuda/CUDAContext.h`` includes ``cusparse.h`` and ``cublas_v2.h``, which a toolkit made of
    NVIDIA's compiler packages alone lacks (this project's CPU machine has such a /usr/local/cuda-13.0, and
    exllamav2's build fails there without them). They go in CPLUS_INCLUDE_PATH, which gcc (and nvcc, through
    gcc's preprocessor) searches after every folder on the command line: the toolkit's own headers win.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBEE_")}
    path = [str(Path(python).parent), str(site / "bin")]  # ninja sits beside the Python that has torch
    if cuda_home:
        env["CUDA_HOME"] = cuda_home
        path.append(str(Path(cuda_home) / "bin"))
    env["PATH"] = os.pathsep.join([*path, env.get("PATH", "/usr/bin:/bin")])
    if includes:
        env["CPLUS_INCLUDE_PATH"] = os.pathsep.join([*filter(None, [env.get("CPLUS_INCLUDE_PATH")]), *includes])
    env["PYTHONPATH"] = str(site)
    env["PYTHONUNBUFFERED"] = "1"
    env["TORCH_EXTENSIONS_DIR"] = str(work / "torch_extensions")
    env["MAX_JOBS"] = str(os.cpu_count() or 4)
    if arch and not env.get("TORCH_CUDA_ARCH_LIST"):
        env["TORCH_CUDA_ARCH_LIST"] = arch  # this GPU only: the build compiles once, not once per architecture
    env["RBEE_HOME"] = str(work / "home")
    return env


def first_line(cmd: list[str], containing: str = "") -> str:
    """The first line of a command's output (that contains ``containing``), or why there is none."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({type(exc).__name__})"
    lines = [line.strip() for line in (done.stdout or done.stderr).splitlines() if containing in line and line.strip()]
    return lines[0] if lines else f"exit status {done.returncode}"


# -- the proof ---------------------------------------------------------------------------------------


class Proof:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.kit = Path(args.kit).resolve()
        self.out = Path(args.out).resolve()
        self.work = Path(args.work).resolve()
        self.site = self.work / "site"
        self.python = args.python
        self.deadline = Deadline(args.budget_s)
        self.report = Report()
        self.env: dict[str, str] = {}
        self.direct: dict[str, Any] = {}

    # -- bookkeeping

    def needs(self, *names: str) -> None:
        for name in names:
            if not self.report.passed(name):
                raise NotRun(f"not run: needs '{name}', which did not pass")

    def record(self, name: str, started: float, ok: bool, detail: str, data: dict[str, Any] | None = None) -> Check:
        check = self.report.add(Check(name, ok, detail, round(time.monotonic() - started, 2), data or {}))
        print(f"[{'pass' if ok else 'FAIL'}] {name} ({check.seconds:.1f} s): {detail}", flush=True)
        self.report.write(self.out)
        return check

    def step(self, name: str, body: Callable[[float], tuple[bool, str, dict[str, Any]]], want_s: float) -> Check:
        """Run ``body(timeout)``; whatever it raises becomes this check's failure, never the proof's end."""
        started = time.monotonic()
        try:
            ok, detail, data = body(self.deadline.timeout(want_s))
        except NotRun as exc:
            return self.record(name, started, False, str(exc))
        except Exception as exc:  # noqa: BLE001 - the report says what broke; the next steps go on
            return self.record(name, started, False, f"{type(exc).__name__}: {exc}")
        return self.record(name, started, ok, detail, data)

    async def astep(self, name: str, body: Callable[[], Awaitable[tuple[bool, str, dict[str, Any]]]], want_s: float) -> Check:
        started = time.monotonic()
        try:
            ok, detail, data = await asyncio.wait_for(body(), self.deadline.timeout(want_s))
        except NotRun as exc:
            return self.record(name, started, False, str(exc))
        except asyncio.TimeoutError:
            return self.record(name, started, False, f"timed out after {time.monotonic() - started:.0f} s")
        except Exception as exc:  # noqa: BLE001
            return self.record(name, started, False, f"{type(exc).__name__}: {exc}")
        return self.record(name, started, ok, detail, data)

    # -- steps

    def check_kit(self, timeout: float) -> tuple[bool, str, dict[str, Any]]:
        problems = verify(self.kit)
        if problems:
            return False, f"{len(problems)} problem(s): {'; '.join(problems[:5])}", {"problems": problems}
        manifest = json.loads((self.kit / "manifest.json").read_text())
        wheels = [w["file"] for w in manifest["wheels"]]
        self.report.versions["rbee-fleet (kit)"] = f"{manifest['rbee_fleet']['version']} ({manifest['rbee_fleet']['commit']})"
        return True, f"{len(manifest['files'])} files match the manifest; wheels: {', '.join(wheels)}", {"wheels": wheels}

    def check_gpu(self, timeout: float) -> tuple[bool, str, dict[str, Any]]:
        smi = first_line(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"])
        cuda_home = find_cuda_home(self.python)
        self.report.environment.update({
            "nvidia-smi": smi, "cuda_home": cuda_home or "not found",
            "nvcc": first_line([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], "release") if cuda_home else "not found",
            "c++": first_line(["c++", "--version"]) if shutil.which("c++") else "not found",
            "cpus": os.cpu_count(), "work": str(self.work),
        })
        probe = run_child([self.python, str(HERE / "probe.py"), "env"], timeout=timeout).json()
        for key, value in probe.items():
            if key.startswith("version "):
                self.report.versions[key[len("version "):]] = value
            else:
                self.report.environment[key] = value
        self.env = child_env(self.python, self.site, self.work, cuda_home, probe.get("capability"),
                             probe.get("cuda_include_dirs", []))
        if not probe.get("cuda_available"):
            why = probe.get("torch_error") or f"torch {self.report.versions.get('torch')} (CUDA {probe.get('torch_cuda')}) sees no GPU"
            return False, why, probe
        return True, f"{probe['device_name']} (compute {probe['capability']}, {probe['memory_gib']} GiB), driver " \
                     f"{smi.split(',')[1].strip() if smi.count(',') >= 1 else '?'}, torch {self.report.versions.get('torch')} " \
                     f"CUDA {probe.get('torch_cuda')}, nvcc: {cuda_home or 'not found'}", probe

    def install(self, timeout: float) -> tuple[bool, str, dict[str, Any]]:
        shutil.rmtree(self.site, ignore_errors=True)
        wheels = sorted(str(p) for p in (self.kit / "wheels").glob("*.whl"))
        cmd = [self.python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--disable-pip-version-check", "--quiet", "--target", str(self.site), *wheels]
        done = run_child(cmd, timeout=timeout)
        if done.returncode != 0:
            return False, f"pip failed ({done.returncode}): {last_lines(done.stderr or done.stdout, 8)}", {}
        self.report.timings["install_s"] = round(done.seconds, 1)
        return True, f"{len(wheels)} wheels into {self.site} in {done.seconds:.1f} s", {}

    def imports(self, timeout: float) -> tuple[bool, str, dict[str, Any]]:
        found = run_child([self.python, str(HERE / "probe.py"), "imports"], timeout=timeout, env=self.env, cwd=self.work).json()
        self.report.versions.update(found.get("versions", {}))
        modules = found["modules"]
        broken = {k: v for k, v in modules.items() if v.startswith("FAILED")}
        outside = {k: v for k, v in modules.items() if k.startswith("rbee_fleet") and not v.startswith(str(self.site))}
        if broken or outside or found["unmet"]:
            return False, f"failed imports {broken}; rbee_fleet not from the kit {outside}; unmet {found['unmet']}", found
        return True, f"{len(modules)} modules import, rbee_fleet from {self.site}, every requirement met", found

    def build(self, timeout: float) -> tuple[bool, str, dict[str, Any]]:
        ext_dir = Path(self.env["TORCH_EXTENSIONS_DIR"])
        before = len(list(ext_dir.rglob("*.o"))) if ext_dir.exists() else 0
        done = run_child([self.python, str(HERE / "probe.py"), "build"], timeout=timeout, env=self.env, cwd=self.work,
                         log=self.out / "build.log")
        if done.returncode is None:
            return False, f"the build did not finish within {timeout:.0f} s (see build.log)", {}
        built = done.json()
        objects = len(list(ext_dir.rglob("*.o")))
        fresh = before == 0
        built |= {"wall_s": round(done.seconds, 1), "objects": objects, "fresh": fresh, "dir": str(ext_dir),
                  "arch": self.env.get("TORCH_CUDA_ARCH_LIST"), "jobs": self.env.get("MAX_JOBS")}
        self.report.timings["extension_build_s"] = built["wall_s"] if fresh else f"{built['wall_s']} (reused an earlier build)"
        self.report.versions["exllamav2"] = built["exllamav2"]
        self.report.environment["flash_attn"] = built["flash_attn"]
        self.report.environment["paged_attention"] = built["paged_attention"]
        how = f"compiled {objects} objects for sm {built['arch']} with {built['jobs']} jobs" if fresh else "reused the earlier build"
        return True, f"exllamav2_ext loaded after {built['wall_s']} s ({how}); flash-attn {built['flash_attn']}, " \
                     f"paged attention {built['paged_attention']}", built

    def hive_check(self, timeout: float) -> tuple[bool, str, dict[str, Any]]:
        done = run_child([self.python, "-m", "rbee_fleet.hive", "--check"], timeout=timeout, env=self.env, cwd=self.work)
        try:
            found = json.loads(done.stdout)
        except ValueError:
            found = {"stdout": done.stdout[-3000:], "stderr": done.stderr[-3000:]}
        return done.returncode == 0, f"exit status {done.returncode}: {last_lines(done.stdout or done.stderr, 3)[:400]}", found

    def baseline(self, timeout: float) -> tuple[bool, str, dict[str, Any]]:
        a = self.args
        cmd = [self.python, str(HERE / "direct.py"), "--model", str(self.kit / "model"), "--ctx", str(a.ctx),
               "--max-tokens", str(a.max_tokens), "--runs", str(a.runs), "--concurrent", str(a.concurrent)]
        self.direct = run_child(cmd, timeout=timeout, env=self.env, cwd=self.work, log=self.out / "direct.log").json()
        d = self.direct
        self.report.timings["direct"] = {k: d[k] for k in ("ttft_ms_median", "decode_tok_s_median", "load_s", "paged")} \
            | {"concurrent_tok_s": d["concurrent"]["tok_s"]}
        return True, f"exllamav2's own generator: first token {d['ttft_ms_median']} ms, {d['decode_tok_s_median']} tok/s " \
                     f"decode (medians of {a.runs}); {a.concurrent} jobs together {d['concurrent']['tok_s']} tok/s " \
                     f"(batch {d['batch']}); load {d['load_s']} s", d

    async def fleet_checks(self) -> None:
        import aiohttp

        from tests.gpu_proof import fleet

        a = self.args
        script = self.site / "bin" / "queen-rbee"
        command = [self.python, str(script)] if script.is_file() else [self.python, "-m", "rbee_fleet.queen"]
        queen = None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                async def up() -> tuple[bool, str, dict[str, Any]]:
                    nonlocal queen
                    self.needs("the kit's packages import")
                    queen = fleet.start_queen(command, self.work, self.env)
                    await fleet.wait_healthy(session, queen, 60)
                    return True, f"queen-rbee (pid {queen.process.pid}) answers at {queen.url}", {"command": command}

                await self.astep("queen starts", up, 75)

                async def model() -> tuple[bool, str, dict[str, Any]]:
                    self.needs("queen starts")
                    got = await fleet.run_job(session, queen, {"kind": "model_download", "source": str(self.kit / "model"),
                                                               "name": fleet.MODEL})
                    entry = got["model"]
                    return entry["format"] == "safetensors", f"{entry['id']}: {entry['format']}, {entry['size_bytes']} bytes", got

                await self.astep("model into the hive's catalog", model, 120)

                async def spawn() -> tuple[bool, str, dict[str, Any]]:
                    self.needs("model into the hive's catalog", "exllamav2 extension builds")
                    op = {"kind": "worker_spawn", "model": fleet.MODEL, "backend": "exllamav2", "device": "auto",
                          "ctx_size": a.ctx, "max_queue": max(8, a.concurrent),
                          "options": {"cache": "fp16", "max_batch_size": a.concurrent, "warmup": True}}
                    started = time.monotonic()
                    notes = ""
                    try:
                        got = await fleet.run_job(session, queen, op)
                    except fleet.FleetError as exc:  # placement failed: say so, and still try the GPU by number
                        notes = f"device=auto failed ({exc}); "
                        got = await fleet.run_job(session, queen, op | {"device": "cuda:0", "worker_id": "kit-tiny-cuda0"})
                    load_s = round(time.monotonic() - started, 1)
                    hb = await fleet.wait_ready(session, queen, 30)
                    self.report.timings["worker_spawn_to_ready_s"] = load_s
                    worker = got["worker"]
                    placement.update(ok=not notes, device=worker["device"], note=notes)
                    ok = worker["device"].startswith("cuda:") and hb["state"] == "ready"
                    return ok, f"{notes}{worker['worker_id']} on {worker['device']} ready in {load_s} s; slots " \
                               f"{hb['slots_total']}, cache {hb.get('cache_tokens_total')} tokens, VRAM {hb.get('vram_used_mb')} MB", \
                        {"worker": worker, "heartbeat": hb}

                placement: dict[str, Any] = {}
                served = "exllamav2 worker spawned through the queen"
                await self.astep(served, spawn, 300)

                async def placed() -> tuple[bool, str, dict[str, Any]]:
                    self.needs(served)
                    if placement["ok"]:
                        return True, f"the hive chose {placement['device']} by free VRAM", placement
                    return False, placement["note"].rstrip("; "), placement

                await self.astep("device=auto placement on the GPU", placed, 5)

                async def single() -> tuple[bool, str, dict[str, Any]]:
                    self.needs(served)
                    o = await fleet.single_streams(session, queen, a.runs, a.max_tokens)
                    self.report.timings["queen"] = {"ttft_ms_median": o.data["ttft_ms_median"],
                                                    "decode_tok_s_median": o.data["decode_tok_s_median"]}
                    return o.ok, o.detail, o.data

                await self.astep("chat streams through the queen", single, 120)

                async def many() -> tuple[bool, str, dict[str, Any]]:
                    self.needs(served)
                    o = await fleet.concurrent_streams(session, queen, a.concurrent, 64)
                    self.report.timings.setdefault("queen", {})["concurrent_tok_s"] = o.data["tok_s"]
                    self.report.environment["batching"] = o.data["mode"]
                    return o.ok, o.detail, o.data

                await self.astep(f"{a.concurrent} concurrent streams", many, 180)

                async def cancel() -> tuple[bool, str, dict[str, Any]]:
                    self.needs(served)
                    o = await fleet.cancel_mid_stream(session, queen, a.ctx - 256)
                    return o.ok, o.detail, o.data

                await self.astep("a stream cut mid-way gives its cache back", cancel, 90)

                async def overflow() -> tuple[bool, str, dict[str, Any]]:
                    self.needs(served)
                    o = await fleet.context_overflow(session, queen)
                    return o.ok, o.detail, o.data

                await self.astep("prompt + max_tokens over the cache is a 400", overflow, 60)
            finally:
                if queen is not None:
                    await asyncio.to_thread(queen.stop)

    def compare(self, timeout: float) -> tuple[bool, str, dict[str, Any]]:
        self.needs("exllamav2's own generator (baseline)", "chat streams through the queen")
        d, q = self.report.timings["direct"], self.report.timings["queen"]
        ratio = round(q["decode_tok_s_median"] / d["decode_tok_s_median"], 3)
        added = round(q["ttft_ms_median"] - d["ttft_ms_median"], 2)
        data = {"decode_ratio": ratio, "ttft_added_ms": added, "queen": q, "direct": d}
        self.report.timings["queen_vs_direct"] = {"decode_ratio": ratio, "ttft_added_ms": added}
        return True, f"decode through the queen {q['decode_tok_s_median']} vs direct {d['decode_tok_s_median']} tok/s " \
                     f"(ratio {ratio}); first token {q['ttft_ms_median']} vs {d['ttft_ms_median']} ms ({added:+} ms)", data

    def collect_logs(self) -> None:
        """queen.log and worker.log (the last LOG_LIMIT bytes of each) into OUT."""
        if (self.work / "queen.log").exists():
            (self.out / "queen.log").write_text(tail(self.work / "queen.log", LOG_LIMIT))
        workers = sorted((self.work / "home" / "logs").glob("worker-*.log"))
        if workers:
            (self.out / "worker.log").write_text("".join(f"=== {p.name}\n{tail(p, LOG_LIMIT // len(workers))}\n" for p in workers))

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        for stale in ("queen.log", "inventory.toml"):
            (self.work / stale).unlink(missing_ok=True)
        shutil.rmtree(self.work / "home", ignore_errors=True)
        for log in ("build.log", "direct.log"):
            (self.out / log).unlink(missing_ok=True)
        self.report.environment["command"] = " ".join(sys.argv)
        self.report.write(self.out)
        try:
            self.step("kit matches its manifest", self.check_kit, 60)
            self.step("CUDA GPU visible to torch", self.check_gpu, 120)
            if not self.env:  # the probe failed before it could say where nvcc is: still install and import
                self.env = child_env(self.python, self.site, self.work, find_cuda_home(self.python), None)

            def needing(names: tuple[str, ...], body: Callable[[float], tuple[bool, str, dict[str, Any]]]):
                def wrapped(timeout: float) -> tuple[bool, str, dict[str, Any]]:
                    self.needs(*names)
                    return body(timeout)
                return wrapped

            self.step("wheels install offline into a private directory", needing(("kit matches its manifest",), self.install), 180)
            self.step("the kit's packages import", needing(("wheels install offline into a private directory",), self.imports), 120)
            self.step("exllamav2 extension builds", needing(("CUDA GPU visible to torch", "the kit's packages import"), self.build), 420)
            self.step("rbee-hive --check", needing(("exllamav2 extension builds",), self.hive_check), 120)
            self.step("exllamav2's own generator (baseline)", needing(("exllamav2 extension builds",), self.baseline), 180)
            try:
                asyncio.run(self.fleet_checks())
            except Exception as exc:  # noqa: BLE001 - e.g. aiohttp missing: the report says so
                self.record("fleet checks", time.monotonic(), False, f"{type(exc).__name__}: {exc}")
            self.step("queen vs exllamav2 directly", self.compare, 10)
        finally:
            self.collect_logs()
            self.report.finished = time.time()
            self.report.write(self.out)
        print(f"\n{self.report.to_text()}\nreport: {self.out / 'report.txt'}", flush=True)
        return 0 if self.report.ok else 1


def main(argv: list[str] | None = None) -> int:
    return Proof(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
