"""The GPU kit, built for real (PyPI for the wheels, SmolLM2's GGUF for the tokenizer), checked without a GPU.

What the GPU machine will do with it is checked here as far as a CPU allows: the kit fits what travels,
matches its manifest, ships every requirement the GPU machine lacks, installs offline into a CPython 3.12
target, and its model loads in transformers (CPU), in exllamav2's own config and tokenizer (with the
CUDA extension's stand-in) and in the worker's catalog, template and stop-token code.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.gpu_proof import kit as kit_builder
from tests.gpu_proof.manifest import MANIFEST, file_entries, verify
from tests.gpu_proof.wheels import (
    GPU_MACHINE_HAS,
    NOT_NEEDED,
    PLATFORMS,
    KitError,
    Wheel,
    compatible,
)

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Name three things bees make."}]
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TEXTS = [
    "Hello world, 12345 bees!",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "  spaces\tand\nnewlines: café, naïve, 😀 and 漢字",
    "def f(x):\n    return x ** 2  # 2025-11-30",
]


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kit") / ".gpu-kit"
    kit_builder.build(out, kit_builder.default_cache())
    return out


@pytest.fixture(scope="module")
def manifest(kit: Path) -> dict:
    return json.loads((kit / MANIFEST).read_text())


@pytest.fixture(scope="module")
def model_dir(kit: Path) -> Path:
    return kit / "model"


def find_python312() -> str | None:
    """A CPython 3.12 that runs (a pyenv shim on PATH may not, when another version is selected)."""
    candidates = [shutil.which("python3.12"), *map(str, sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")))]
    for python in filter(None, candidates):
        try:
            done = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                                  text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0 and done.stdout.strip() == "(3, 12)":
            return python
    return None


# -- the kit -----------------------------------------------------------------------------------------


def test_the_kit_matches_its_manifest_and_fits_what_travels(kit: Path, manifest: dict) -> None:
    assert verify(kit) == []
    kit_bytes = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    tree = kit_builder.working_tree_bytes()
    assert tree is not None and tree > 100_000
    print(f"\nkit {kit_bytes / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB of 64 MiB")
    assert kit_bytes + tree <= 64 * 2**20
    assert manifest["bytes"]["kit"] + manifest["bytes"]["working_tree"] <= manifest["bytes"]["limit"] == 64 * 2**20
    names = {w["name"] for w in manifest["wheels"]}
    assert {"rbee-fleet", "pydantic", "pydantic-core", "exllamav2"} <= names
    assert not names & {"torch", "transformers", "aiohttp", "numpy", "safetensors", "tokenizers"}  # there already
    assert next(w for w in manifest["wheels"] if w["name"] == "exllamav2")["version"] == "0.3.2"
    for wheel in (kit / "wheels").iterdir():
        assert compatible(wheel), f"{wheel.name} does not install on CPython 3.12 x86-64 Linux"


def test_the_manifest_catches_a_changed_missing_or_extra_file(tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "a.whl").write_bytes(b"a" * 10)
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / MANIFEST).write_text(json.dumps({"files": file_entries(tmp_path)}))
    assert verify(tmp_path) == []
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    (tmp_path / "wheels" / "a.whl").unlink()
    (tmp_path / "stray.txt").write_text("?")
    problems = verify(tmp_path)
    assert any(p.startswith("model.safetensors: differs") for p in problems)
    assert "wheels/a.whl: in the manifest but missing" in problems
    assert "stray.txt: not in the manifest" in problems


def test_every_requirement_is_shipped_or_on_the_gpu_machine(kit: Path, manifest: dict) -> None:
    shipped = {w.name: w for w in map(Wheel.of, (kit / "wheels").glob("*.whl"))}
    for wheel in shipped.values():
        for req in wheel.requires():
            name = canonicalize_name(req.name)
            if name in shipped:
                assert req.specifier.contains(shipped[name].version, prereleases=True), f"{wheel.name}: {req}"
            else:
                assert name in GPU_MACHINE_HAS or name in NOT_NEEDED, f"{wheel.name} needs {req}, neither shipped nor there"
    assert manifest["not_shipped"]["torch"] == "already on the GPU machine"
    assert set(NOT_NEEDED) <= set(manifest["not_shipped"])


def test_exllamav2_never_imports_what_the_kit_leaves_out(kit: Path) -> None:
    """fastparquet and websockets are left out: only exllamav2's converter and server import them."""
    [wheel] = (kit / "wheels").glob("exllamav2-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if not name.endswith(".py"):
                continue
            text = zf.read(name).decode("utf-8", errors="replace")
            for module in ("fastparquet", "websockets"):
                if f"import {module}" in text or f"from {module}" in text:
                    assert name.startswith(("exllamav2/conversion/", "exllamav2/server/")), f"{name} imports {module}"


def test_a_second_build_is_served_from_the_cache(kit: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    started = time.monotonic()
    again = kit_builder.build(tmp_path / "kit2", kit_builder.default_cache(), log=lines.append)
    took = time.monotonic() - started
    assert not [line for line in lines if "downloading" in line or "building" in line or "writing" in line], lines
    assert took < 30, f"a cached build took {took:.1f} s"
    ours = json.loads((kit / MANIFEST).read_text())["files"]
    assert again["files"] == ours  # same wheels, same model, byte for byte


def test_a_kit_over_the_limit_is_refused(kit: Path, tmp_path: Path) -> None:
    with pytest.raises(KitError, match=r"over the 20 MiB that may travel"):
        kit_builder.build(tmp_path / "big", kit_builder.default_cache(), limit_mib=20, log=lambda line: None)
    assert not (tmp_path / "big").exists() and not (tmp_path / "big.tmp").exists()


def test_a_folder_that_is_not_a_kit_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(KitError, match="not a GPU kit"):
        kit_builder.build(tmp_path, kit_builder.default_cache(), log=lambda line: None)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_the_wheels_install_offline_into_a_python_312_target(kit: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    wheels = sorted(str(p) for p in (kit / "wheels").glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index", "--no-deps",
           "--find-links", str(kit / "wheels"), "--target", str(target), "--python-version", "3.12",
           "--implementation", "cp", "--only-binary=:all:", *platforms, *wheels]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for package in ("rbee_fleet", "pydantic", "pydantic_core", "exllamav2", "typing_extensions", "annotated_types"):
        assert (target / package).is_dir() or (target / f"{package}.py").is_file(), f"{package} missing from the target"
    assert list((target / "pydantic_core").glob("_pydantic_core.cpython-312-x86_64-linux-gnu.so"))
    assert (target / "exllamav2" / "exllamav2_ext" / "ext_bindings.cpp").is_file()  # the JIT build's sources
    assert (target / "bin" / "queen-rbee").is_file()

    python312 = find_python312()
    if python312 is None:
        pytest.skip("installed for CPython 3.12, but no working python3.12 here to import it with")
    # Only the target and the standard library (-S): pydantic's compiled core and our wire models load on 3.12.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import pydantic, pydantic_core, rbee_fleet.contracts.fleet as f; "
            "print(pydantic.VERSION, f.WorkerSpawnOp(model='m', device='cuda:0').device, f.__file__)")
    done = subprocess.run([str(python312), "-S", "-c", code, str(target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cuda:0" in done.stdout and str(target) in done.stdout


# -- the model ---------------------------------------------------------------------------------------


def test_the_model_loads_in_transformers_and_never_ends_an_answer(model_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 64  # a head size exllamav2's kernels take
    assert config["hidden_size"] % 128 == 0 and config["intermediate_size"] % 128 == 0
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    ids = getattr(ids, "input_ids", ids)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    assert (logits[0, :, stops] == 0).all() and (logits[0].max(dim=-1).values > 0).all()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
    assert out.shape[1] == ids.shape[1] + 24  # greedy never picks a stop token: every answer runs to max_tokens


def test_the_tokenizer_is_smollm2s_own(model_dir: Path) -> None:
    """Same ids as transformers' own reading of the GGUF (and as llama.cpp's, where llama-cpp-python is here)."""
    import importlib.util

    from transformers import AutoTokenizer

    from tests.support import procs

    gguf = Path(procs.model_path())
    references = {"transformers' GGUF reader": AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)}
    tok = AutoTokenizer.from_pretrained(model_dir)
    llama = None
    if importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp

        llama = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        for name, ref in references.items():
            assert ids == ref.encode(text, add_special_tokens=False), f"{name}: {text!r}"
        if llama is not None:
            assert ids == llama.tokenize(text.encode(), add_bos=False, special=True), f"llama.cpp: {text!r}"
        assert tok.decode(ids) == text
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2 and len(tok) == 49152


def test_the_chat_template_is_smollm2s_and_the_worker_renders_it_alike(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from rbee_fleet.worker.backends.exllamav2_load import ChatConfig
    from rbee_fleet.worker.chat_template import ChatTemplate

    text = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == (f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nName three things bees make.<|im_end|>\n<|im_start|>assistant\n")
    chat = ChatConfig.read(model_dir)
    assert (chat.bos_token, chat.eos_token, chat.add_bos) == ("<|im_start|>", "<|im_end|>", False)
    assert ChatTemplate(chat.template, bos_token=chat.bos_token, eos_token=chat.eos_token).render(MESSAGES) == text


def test_exllamav2_reads_the_model_and_the_worker_stops_on_its_eos(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from rbee_fleet.common.vram import ModelShape
    from rbee_fleet.hive.catalog import detect_format
    from rbee_fleet.worker.backends.exllamav2_load import ChatConfig, stop_tokens
    from tests.support.exllamav2_standin import exllamav2  # the real package; its CUDA extension stood in for

    config = exllamav2.ExLlamaV2Config(str(model_dir))
    assert (config.hidden_size, config.head_dim, config.num_hidden_layers, config.vocab_size) == (256, 64, 4, 49152)
    assert config.arch.lm.keys["lm_head"] == "model.embed_tokens"  # tied embeddings, as config.json says
    tokenizer = exllamav2.ExLlamaV2Tokenizer(config)
    hf = AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_bos=False, encode_special_tokens=True)[0].tolist()
        assert ids == hf.encode(text, add_special_tokens=False), text
    assert stop_tokens(config, tokenizer, ChatConfig.read(model_dir, tokenizer)) == {2}
    assert detect_format(model_dir) == "safetensors"
    shape = ModelShape.from_dir(model_dir)
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (4, 2, 64)
