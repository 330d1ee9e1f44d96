"""Run every benchmark module here (``bench_*.py``), each through its ``main()``: ``just bench``."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_"))
    wanted = set(argv if argv is not None else sys.argv[1:])
    failed = 0
    for name in names:
        if wanted and name not in wanted:
            continue
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        try:
            code = importlib.import_module(f"tests.bench.{name}").main()
        except Exception as exc:  # noqa: BLE001 - one failing benchmark does not hide the others' figures
            print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)
            code = 1
        failed += bool(code)
        print(f"=== {name}: {time.monotonic() - started:.0f} s ===", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
