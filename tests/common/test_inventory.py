"""Inventory parsing: typed, and every mistake named by file, line and key."""

from pathlib import Path

import pytest

from rbee_fleet.common.inventory import InventoryError, default_inventory, load_inventory, parse_inventory

REPO = Path(__file__).resolve().parents[2]


def test_localhost_inventory_is_the_builtin_default():
    inv = load_inventory(REPO / "inventory" / "localhost.toml")
    default = default_inventory()
    assert inv.queen == default.queen
    assert inv.spawn_ops("localhost") == default.spawn_ops("localhost")
    assert [op.worker_id for op in inv.spawn_ops("localhost")] == ["localhost-smollm2-0"]
    assert inv.queen.host == "127.0.0.1" and inv.queen.port == 8500


def test_every_example_inventory_parses():
    for path in sorted((REPO / "inventory").glob("*.toml")):
        load_inventory(path)


def error_of(text: str) -> InventoryError:
    with pytest.raises(InventoryError) as info:
        parse_inventory(text, "fleet.toml")
    return info.value


def test_unknown_key_names_line_and_suggests():
    err = error_of('[queen]\nport = 8500\n\n[hives.a]\nembedded = true\n\n[[hives.a.workers]]\nmodel = "x"\n\n[[hives.a.workers]]\nmodle = "x"\n')
    assert (err.line, err.key) == (11, "hives.a.workers[1].modle")
    assert "did you mean 'model'" in str(err)
    assert str(err).startswith("fleet.toml:11: hives.a.workers[1].modle:")


def test_wrong_type_names_line():
    err = error_of('[queen]\nhost = "127.0.0.1"\nport = "eighty"\n')
    assert (err.line, err.key) == (3, "queen.port")


def test_bad_device_in_inline_table():
    err = error_of('[hives.gpu]\naddress = "10.0.0.2"\nworkers = [{model = "m", device = "gpu0"}]\n')
    assert err.line == 3 and err.key == "hives.gpu.workers[0].device"


def test_toml_syntax_error_has_a_line():
    err = error_of('[queen]\nport = 8500\n[hives\n')
    assert err.line == 3 and "invalid TOML" in err.message


def test_missing_file_is_named(tmp_path):
    with pytest.raises(InventoryError) as info:
        load_inventory(tmp_path / "nope.toml")
    assert "nope.toml" in str(info.value) and "cannot read" in str(info.value)


def test_two_embedded_hives_are_refused():
    err = error_of("[hives.a]\nembedded = true\n[hives.b]\nembedded = true\n")
    assert err.key == "hives" and "only one hive" in err.message


def test_worker_ids_are_stable_and_distinct():
    inv = parse_inventory('[hives.h]\n[[hives.h.workers]]\nmodel = "m"\ncount = 2\n[[hives.h.workers]]\nmodel = "m"\n'
                          '[[hives.h.workers]]\nmodel = "n"\nname = "chat"\n')
    assert [w for w, _ in inv.worker_plan("h")] == ["h-m-0", "h-m-1", "h-m-2", "chat"]


def test_api_keys_from_environment(monkeypatch):
    monkeypatch.setenv("RBEE_API_KEYS", "k1, k2")
    inv = parse_inventory('[queen]\napi_keys = ["k0"]\n')
    assert inv.queen.effective_api_keys() == ["k0", "k1", "k2"]


def test_embedded_workers_listen_where_they_are_advertised(tmp_path):
    from rbee_fleet.common.paths import Layout
    from rbee_fleet.queen.settings import settings_from_inventory

    inv = parse_inventory('[queen]\nhost = "127.0.0.1"\n[hives.ws]\nembedded = true\naddress = "10.0.0.5"\n')
    hive = settings_from_inventory(inv, Layout(tmp_path)).embedded_hive
    assert hive.bind_host == hive.advertise_host == "127.0.0.1"  # a loopback queen reaches them there
    inv = parse_inventory('[queen]\nhost = "0.0.0.0"\napi_keys = ["k"]\n[hives.ws]\nembedded = true\naddress = "10.0.0.5"\n')
    hive = settings_from_inventory(inv, Layout(tmp_path)).embedded_hive
    assert hive.bind_host == hive.advertise_host == "10.0.0.5"


def test_drain_and_client_limits_come_from_the_inventory_and_the_command_line(tmp_path):
    from rbee_fleet.common.paths import Layout
    from rbee_fleet.queen.main import parse_args
    from rbee_fleet.queen.settings import settings_from_inventory

    inv = parse_inventory('[queen]\ndrain_timeout_s = 90\nheader_timeout_s = 4\nbody_timeout_s = 12\n'
                          'max_connections_per_client = 32\n')
    settings = settings_from_inventory(inv, Layout(tmp_path))
    assert settings.config.drain_timeout_s == 90
    limits = settings.client_limits
    assert (limits.header_timeout_s, limits.body_timeout_s, limits.max_connections_per_client) == (4, 12, 32)
    args = parse_args(["--drain-timeout", "5"])
    assert settings_from_inventory(inv, Layout(tmp_path), drain_timeout_s=args.drain_timeout).config.drain_timeout_s == 5
    defaults = settings_from_inventory(default_inventory(), Layout(tmp_path))
    assert defaults.config.drain_timeout_s == 60 and defaults.client_limits.header_timeout_s == 10
    with pytest.raises(InventoryError, match="max_connections_per_client"):
        parse_inventory("[queen]\nmax_connections_per_client = 0\n")


def test_on_demand_settings_per_queen_hive_and_model(tmp_path):
    from rbee_fleet.common.paths import Layout
    from rbee_fleet.queen.settings import settings_from_inventory

    inv = parse_inventory(
        '[queen]\nidle_ttl_s = 60\nprefix_load_guard = 0.25\n\n'
        '[hives.box]\nembedded = true\nmemory_budget_mb = 2048\n\n'
        '[models.smollm2]\nidle_ttl_s = 0\nmemory_mb = 300\nthreads = 1\n'
    )
    settings = settings_from_inventory(inv, Layout(tmp_path))
    assert settings.hive_budgets_mb == {"box": 2048} and settings.config.prefix_load_guard == 0.25
    assert settings.idle_ttl("smollm2") == 0 and settings.idle_ttl("other") == 60
    assert settings.policy("smollm2").memory_mb == 300 and settings.policy("other").memory_mb is None
    with pytest.raises(InventoryError) as err:
        parse_inventory('[models.smollm2]\nidle_ttl = 5\n', "inv.toml")
    assert str(err.value) == "inv.toml:2: models.smollm2.idle_ttl: unknown key (did you mean 'idle_ttl_s'?)"
    with pytest.raises(InventoryError, match="inv.toml:2: queen.load_timeout_s"):
        parse_inventory('[queen]\nload_timeout_s = 0\n', "inv.toml")
