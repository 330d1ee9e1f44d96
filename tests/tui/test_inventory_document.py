"""Editing an inventory in forms: typed and validated values, unknown keys kept, diff, atomic save."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from rbee_fleet.common.inventory import InventoryError, load_inventory
from rbee_fleet.tui.inventory_document import (
    HOST_FIELDS,
    WORKER_FIELDS,
    FormError,
    InventoryDocument,
    form_values,
)

TEXT = """\
# my fleet
[queen]
port = 8600
heartbeat_interval_s = 2.0

[defaults]
ssh_user = "ops"

[hives.home]
embedded = true

[[hives.home.workers]]
model = "smollm2"
options = { flash_attn = "true" }
"""


@pytest.fixture
def doc(tmp_path: Path) -> InventoryDocument:
    path = tmp_path / "fleet.toml"
    path.write_text(TEXT)
    os.chmod(path, 0o640)
    return InventoryDocument.load(path)


def test_form_fields_come_from_the_inventory_models():
    assert [f.name for f in HOST_FIELDS][:3] == ["embedded", "address", "port"]
    backend = next(f for f in WORKER_FIELDS if f.name == "backend")
    assert backend.choices == ("auto", "llamacpp", "exllamav2")
    assert next(f for f in WORKER_FIELDS if f.name == "model").required
    assert "options" not in {f.name for f in WORKER_FIELDS} and "workers" not in {f.name for f in HOST_FIELDS}


def test_add_host_and_worker_then_save_keeps_unknown_keys(doc: InventoryDocument):
    doc.set_host("gpu-1", {"address": "10.0.0.7", "port": "9001", "install_source": "online", "embedded": False})
    doc.set_worker("gpu-1", None, {"model": "qwen", "device": "cuda:0,1", "count": "2", "backend": "exllamav2"})
    assert doc.dirty
    diff = doc.diff()
    assert "+[hives.gpu-1]" in diff and "# my fleet" not in diff  # comments are kept: the diff shows only the edit
    inv = doc.save()
    assert not doc.dirty
    assert oct(doc.path.stat().st_mode & 0o777) == oct(0o640)
    again = load_inventory(doc.path)
    assert again == inv
    gpu = again.hives["gpu-1"]
    assert (gpu.address, gpu.port, gpu.install_source, gpu.embedded) == ("10.0.0.7", 9001, "online", False)
    assert [(w.model, w.device, w.count, w.backend) for w in gpu.workers] == [("qwen", "cuda:0,1", 2, "exllamav2")]
    # Keys the forms do not show survive the round trip.
    assert again.queen.port == 8600 and again.queen.heartbeat_interval_s == 2.0
    assert again.defaults.ssh_user == "ops"
    assert again.hives["home"].workers[0].options == {"flash_attn": "true"}
    assert "embedded" not in doc.host("gpu-1")  # an unticked box adds no key


def test_edit_rename_and_clear_a_field(doc: InventoryDocument):
    doc.set_host("gpu-1", {"address": "10.0.0.7", "ssh_user": "bee"})
    doc.set_host("gpu-2", {**form_values(doc.host("gpu-1"), HOST_FIELDS), "ssh_user": ""}, old_alias="gpu-1")
    assert doc.hosts() == ["home", "gpu-2"]
    assert doc.host("gpu-2") == {"address": "10.0.0.7"}
    doc.set_worker("home", 0, {"model": "smollm2", "ctx_size": "1024"})
    assert doc.workers("home")[0] == {"model": "smollm2", "options": {"flash_attn": "true"}, "ctx_size": 1024}


def test_remove_and_revert(doc: InventoryDocument):
    doc.remove_worker("home", 0)
    doc.set_host("x", {})
    doc.remove_host("x")
    assert doc.workers("home") == [] and doc.dirty
    doc.revert()
    assert not doc.dirty and len(doc.workers("home")) == 1


@pytest.mark.parametrize(("values", "field", "words"), [
    ({"model": "m", "device": "gpu0"}, "device", "cuda:N"),
    ({"model": "m", "count": "0"}, "count", "greater than or equal to 1"),
    ({"model": "m", "count": "two"}, "count", "whole number"),
    ({"model": "", "device": "cpu"}, "model", "required"),
    ({"model": "m", "name": "bad name!"}, "name", "pattern"),
])
def test_bad_worker_values_are_refused_per_field(doc: InventoryDocument, values, field, words):
    with pytest.raises(FormError) as info:
        doc.set_worker("home", None, values)
    assert words in info.value.errors[field]
    assert len(doc.workers("home")) == 1  # nothing half-added


def test_bad_host_values_are_refused(doc: InventoryDocument):
    with pytest.raises(FormError) as info:
        doc.set_host("bad alias", {})
    assert "alias" in info.value.errors
    with pytest.raises(FormError) as info:
        doc.set_host("home", {}, old_alias=None)
    assert "already" in info.value.errors["alias"]
    with pytest.raises(FormError) as info:
        doc.set_host("second", {"embedded": True})
    assert "home already is" in info.value.errors["embedded"]
    with pytest.raises(FormError) as info:
        doc.set_host("h", {"port": "70000", "install_source": "floppy"})
    assert set(info.value.errors) == {"port", "install_source"}
    assert doc.hosts() == ["home"]


def test_an_invalid_document_is_never_written(doc: InventoryDocument):
    doc.data["queen"]["prot"] = 1  # as if hand-edited
    with pytest.raises(InventoryError) as info:
        doc.save()
    assert "queen.prot" in str(info.value)
    assert doc.path.read_text() == TEXT


def test_a_missing_file_starts_from_the_builtin_fleet(tmp_path: Path):
    doc = InventoryDocument.load(tmp_path / "inventory" / "new.toml")
    assert doc.hosts() == ["localhost"] and doc.disk_text == ""
    doc.save()
    assert load_inventory(doc.path).hives["localhost"].embedded


def test_bad_toml_names_its_line(tmp_path: Path):
    path = tmp_path / "broken.toml"
    path.write_text("[queen]\nport = \n")
    with pytest.raises(InventoryError) as info:
        InventoryDocument.load(path)
    assert info.value.line == 2


COMMENTED = """\
# the lab's fleet: the queen runs on the NAS
[queen]
port = 8600            # behind the reverse proxy
heartbeat_interval_s = 2.0

[defaults]
ssh_user = "ops"       # the deploy account

# the NAS itself
[hives.home]
embedded = true

[[hives.home.workers]]
model = "smollm2"      # small and quick
options = { flash_attn = "true" }

# the GPU box in the closet
[hives.gpu]
address = "10.0.0.7"
ssh_user = "bee"

[[hives.gpu.workers]]
model = "qwen"         # the big one
device = "cuda:0"
"""


def test_edits_keep_the_files_comments_order_and_layout(tmp_path: Path):
    """Every edit the forms make, on a commented inventory: the file changes in exactly the edited lines."""
    path = tmp_path / "fleet.toml"
    path.write_text(COMMENTED)
    doc = InventoryDocument.load(path)
    doc.set_worker("home", 0, {**form_values(doc.workers("home")[0], WORKER_FIELDS), "ctx_size": "1024"})
    doc.set_host("gpu-1", {**form_values(doc.host("gpu"), HOST_FIELDS), "address": "10.0.0.8"}, old_alias="gpu")
    doc.set_host("cpu-1", {"address": "10.0.0.9", "port": "9001"})
    doc.set_worker("cpu-1", None, {"model": "smollm2", "device": "cpu"})
    doc.save()
    diff = "".join(difflib.unified_diff(COMMENTED.splitlines(keepends=True),
                                        path.read_text().splitlines(keepends=True), n=0))
    assert diff.splitlines()[2:] == [
        "@@ -15,0 +16 @@",
        "+ctx_size = 1024",
        "@@ -18,2 +19,2 @@",
        "-[hives.gpu]",
        '-address = "10.0.0.7"',
        "+[hives.gpu-1]",
        '+address = "10.0.0.8"',
        "@@ -22 +23 @@",
        "-[[hives.gpu.workers]]",
        "+[[hives.gpu-1.workers]]",
        "@@ -24,0 +26,8 @@",
        "+",
        "+[hives.cpu-1]",
        '+address = "10.0.0.9"',
        "+port = 9001",
        "+",
        "+[[hives.cpu-1.workers]]",
        '+model = "smollm2"',
        '+device = "cpu"',
    ]
    again = load_inventory(path)
    assert list(again.hives) == ["home", "gpu-1", "cpu-1"] and again.hives["home"].workers[0].ctx_size == 1024
    # Removing what was added gives the operator's file back, byte for byte.
    doc.remove_host("cpu-1")
    doc.set_host("gpu", {**form_values(doc.host("gpu-1"), HOST_FIELDS), "address": "10.0.0.7"}, old_alias="gpu-1")
    doc.set_worker("home", 0, {**form_values(doc.workers("home")[0], WORKER_FIELDS), "ctx_size": ""})
    doc.save()
    assert path.read_text() == COMMENTED
