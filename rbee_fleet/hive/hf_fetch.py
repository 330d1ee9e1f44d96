"""Download a Hugging Face snapshot in a child process: ``python -m rbee_fleet.hive.hf_fetch``.

``snapshot_download`` cannot be stopped once started, so a cancelled job would keep downloading
gigabytes in a thread. Run as a process instead, it is killed with the job. The last line of
standard output is a JSON object: ``{"ok": true}`` or ``{"ok": false, "error": CLASS, "message": ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rbee_fleet.hive.hf_fetch")
    p.add_argument("repo_id")
    p.add_argument("dest")
    p.add_argument("--revision")
    p.add_argument("--include", action="append", help="allow pattern (repeatable); default: every file")
    args = p.parse_args(argv)
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(args.repo_id, revision=args.revision, allow_patterns=args.include, local_dir=args.dest)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which turns it into a job error
        print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}), flush=True)
        return 1
    print(json.dumps({"ok": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
