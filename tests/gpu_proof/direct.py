"""The baseline: exllamav2's own dynamic generator driven directly, with no worker, queen or HTTP.

    python3 direct.py --model DIR [--ctx 4096] [--max-tokens 128] [--runs 3] [--concurrent 8]

Loads the model as the worker does (same context, fp16 cache, paged only with flash-attn), renders the
same chat prompt with the model's template, and times greedy answers: time to first token and decode
tokens/s per run, then ``--concurrent`` jobs at once. Prints one JSON object on the last stdout line.
Run as a file with the kit's private directory on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "Write a long story about the bees of a mountain village."


def render_chat(model_dir: Path, content: str) -> str:
    import jinja2

    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    template = jinja2.Environment().from_string(cfg["chat_template"])
    return template.render(messages=[{"role": "user", "content": content}], add_generation_prompt=True,
                           bos_token=cfg.get("bos_token") or "", eos_token=cfg.get("eos_token") or "")


def timed(results: list[dict[str, Any]], started: dict[int, float], marks: dict[int, dict[str, Any]]) -> None:
    """Record, per job identifier, when its first and last text came and how many tokens it made."""
    now = time.perf_counter()
    for r in results:
        if r.get("stage") != "streaming":
            continue
        mark = marks.setdefault(r["identifier"], {"first": None, "last": None, "tokens": 0})
        ids = r.get("token_ids")
        if ids is not None and ids.shape[-1]:
            mark["first"] = mark["first"] or now
            mark["last"] = now
            mark["tokens"] += int(ids.shape[-1])
        if r.get("eos"):
            mark["ttft_ms"] = round(1000 * (mark["first"] - started[r["identifier"]]), 2) if mark["first"] else None
            span = (mark["last"] or now) - (mark["first"] or now)
            mark["decode_tok_s"] = round((mark["tokens"] - 1) / span, 1) if span > 0 and mark["tokens"] > 1 else None
            mark["new_tokens"] = int(r.get("new_tokens", mark["tokens"]))
            mark["eos_reason"] = r.get("eos_reason")


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--concurrent", type=int, default=8)
    p.add_argument("--concurrent-tokens", type=int, default=64)
    args = p.parse_args()
    model_dir = Path(args.model)

    t0 = time.perf_counter()
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer, attn
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    config = ExLlamaV2Config(str(model_dir))
    config.max_seq_len = args.ctx
    config.max_input_len = min(int(config.max_input_len), args.ctx)
    config.max_attention_size = config.max_input_len**2
    config.arch_compat_overrides()
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=args.ctx, lazy=True)
    model.load_autosplit(cache, progress=False)
    tokenizer = ExLlamaV2Tokenizer(config)
    paged = bool(getattr(attn, "has_flash_attn_with_paged", False))
    generator = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer,
                                          max_batch_size=args.concurrent if paged else 1, paged=paged)
    generator.warmup()
    load_s = time.perf_counter() - t0

    ids = tokenizer.encode(render_chat(model_dir, PROMPT), add_bos=False, encode_special_tokens=True)
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def run(jobs: int, max_tokens: int) -> tuple[list[dict[str, Any]], float]:
        started: dict[int, float] = {}
        marks: dict[int, dict[str, Any]] = {}
        t_all = time.perf_counter()
        for i in range(jobs):
            started[i] = time.perf_counter()
            generator.enqueue(ExLlamaV2DynamicJob(
                input_ids=ids, max_new_tokens=max_tokens, stop_conditions=stops,
                gen_settings=ExLlamaV2Sampler.Settings.greedy(), identifier=i))
        while generator.num_remaining_jobs():
            timed(generator.iterate(), started, marks)
        return [marks[i] for i in range(jobs)], time.perf_counter() - t_all

    singles = [run(1, args.max_tokens)[0][0] for _ in range(args.runs)]
    many, wall = run(args.concurrent, args.concurrent_tokens)
    tokens = sum(m["new_tokens"] for m in many)
    answer = {
        "paged": paged,
        "batch": args.concurrent if paged else 1,
        "import_s": round(import_s, 2),
        "load_s": round(load_s, 2),
        "prompt_tokens": int(ids.shape[-1]),
        "runs": [{k: m.get(k) for k in ("ttft_ms", "decode_tok_s", "new_tokens", "eos_reason")} for m in singles],
        "ttft_ms_median": median([m.get("ttft_ms") for m in singles]),
        "decode_tok_s_median": median([m.get("decode_tok_s") for m in singles]),
        "concurrent": {"jobs": args.concurrent, "tokens": tokens, "wall_s": round(wall, 3),
                       "tok_s": round(tokens / wall, 1),
                       "ttft_ms": sorted(m["ttft_ms"] for m in many if m.get("ttft_ms") is not None)},
    }
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
