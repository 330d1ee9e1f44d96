"""Download a Hugging Face snapshot in a child process: ``python -m rbee_fleet.hive.hf_fetch``.

``snapshot_download`` cannot be stopped once started, so a cancelled job would keep downloading
gigabytes in a thread. Run as a process instead, it is killed with the job. The last line of
standard output is a JSON object: ``{"ok": true}`` or ``{"ok": false, "error": CLASS, "message": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path

from rbee_fleet.common.errors import OperationFailed


async def run_in_child(repo_id: str, dst: Path, revision: str | None, filename: str | None) -> None:
    """snapshot_download of ``repo_id`` into ``dst`` in a child process, killed if this task is cancelled."""
    cmd = [sys.executable, "-m", "rbee_fleet.hive.hf_fetch", repo_id, str(dst)]
    cmd += ["--revision", revision] if revision else []
    cmd += ["--include", filename] if filename else []
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        status = json.loads(lines[-1]) if lines else {}
    except ValueError:
        status = {}
    if proc.returncode != 0 or not status.get("ok"):
        said = status.get("message") or err.decode(errors="replace").strip()[-500:] or f"exit code {proc.returncode}"
        raise OperationFailed(f"hf:{repo_id}@{revision or 'main'}: download failed: {said}")


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
