"""`just bench`: run every benchmark and print its figures (ratios against baselines of the same run)."""

from __future__ import annotations

import importlib
import sys

BENCHES = [
    "tests.bench.bench_worker",
    "tests.bench.bench_queen",
    "tests.bench.bench_prefix",
    "tests.bench.bench_exllamav2_path",
    "tests.bench.bench_deploy",
    "tests.bench.bench_keeper_start",
]


def main() -> None:
    only = sys.argv[1:]
    for name in BENCHES:
        if only and not any(o in name for o in only):
            continue
        importlib.import_module(name).main()


if __name__ == "__main__":
    main()
