"""Log files are rotated before a daemon reopens them, keeping a bounded number."""

from rbee_fleet.common.logs import rotate_if_large


def test_large_logs_rotate_and_old_ones_are_dropped(tmp_path):
    log = tmp_path / "worker.log"
    for n in range(5):
        log.write_text(f"run {n}\n" + "x" * 100)
        rotate_if_large(log, max_bytes=50, keep=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["worker.log.1", "worker.log.2", "worker.log.3"]
    assert (tmp_path / "worker.log.1").read_text().startswith("run 4")
    assert (tmp_path / "worker.log.3").read_text().startswith("run 2")


def test_small_or_missing_logs_stay(tmp_path):
    log = tmp_path / "queen.log"
    rotate_if_large(log, max_bytes=50)
    log.write_text("short")
    rotate_if_large(log, max_bytes=50)
    assert [p.name for p in tmp_path.iterdir()] == ["queen.log"]
