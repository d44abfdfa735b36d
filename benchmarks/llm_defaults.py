"""`scalerec encode`'s defaults on held-out passages: the length rule + escalation ladder against today's defaults
(one FitConfig() attempt) and the best hand-set flags known, per length; greedy exact rate and seconds per text.

    python benchmarks/llm_defaults.py --quick                      # end to end in a few minutes (8 tokens, 2 passages)
    OMP_NUM_THREADS=1 python benchmarks/llm_defaults.py --modes one-step --lengths 16,32,48,64 --passages 20 \\
        --configs new,today,hand --json-out defaults.json --calibration-out scalerec/llm/calibration/smollm2.json

Passages (token windows of the full tinyshakespeare.txt, SmolLM2 tokenizer): held-out passage j starts at token
``--heldout-start`` (default 200,000) + 1,000 j. The length rule was chosen from the tuning region: the first
15,000 tokens (data/text/tinyshakespeare_head.txt, passages at 1,000 + 500 i) and the two windows at tokens 134,500
and 288,500 of the capacity runs; the held-out windows overlap none of them (checked at start). "Exact" means greedy
decoding (one forward pass, or greedy generation in AR mode) reproduces the passage's token ids. Every cell is
written to --json-out as soon as it is done (a stopped run keeps what it measured); the last line printed is ONE
JSON line with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

TEXT = Path(os.environ.get("SCALEREC_TEXT_DIR", ROOT.parent / "shared" / "data" / "text")) / "tinyshakespeare.txt"
HELDOUT_START, HELDOUT_STRIDE = 200_000, 1_000
TUNING_REGIONS = [(0, 15_000 + 128), (134_500, 134_500 + 128), (288_500, 288_500 + 128)]  # [start, end) tokens

# The best hand-set flags known per mode and length (benchmarks/RESULTS.md): one-step 64 exact on 2 / 2 with 1,200
# steps and restarts off (Run 6); AR 32 on 5 / 5 with 1,000 steps, restarts off (Run 6); AR 64 with a warm ladder
# from 16, 3,000 steps a stage, restarts off (Runs 9-10) and the margin polish (Run 25). 16 tokens: the defaults.
HAND = {
    "one-step": [(16, {}), (128, {"max_steps": 1200, "restart_patience": 0})],
    "ar": [(16, {}), (32, {"max_steps": 1000, "restart_patience": 0}),
           (128, {"grow_from": 16, "max_steps": 3000, "restart_patience": 0, "polish_steps": 400})],
}
CONFIGS = ("new", "today", "hand")


def hand_flags(mode: str, n: int) -> dict:
    for bound, flags in HAND[mode]:
        if n <= bound:
            return dict(flags)
    return dict(HAND[mode][-1][1])


def heldout_passages(ids: list[int], n_passages: int, n_tokens: int, start: int = HELDOUT_START) -> list[list[int]]:
    out = []
    for j in range(n_passages):
        lo = start + HELDOUT_STRIDE * j
        for a, b in TUNING_REGIONS:
            if lo < b and a < lo + n_tokens:
                raise SystemExit(f"held-out passage {j} (tokens {lo}-{lo + n_tokens - 1}) overlaps the tuning region "
                                 f"{a}-{b - 1}; choose another --heldout-start")
        p = ids[lo: lo + n_tokens]
        if len(p) != n_tokens:
            raise SystemExit(f"{TEXT}: {len(ids)} tokens, too few for held-out passage {j} at token {lo}")
        out.append(p)
    return out


def run_cell(lm, mode: str, config: str, texts: list[list[int]], batch_size: int, cap: float | None, log) -> dict:
    from scalerec.llm.schedule import encode_texts

    n = len(texts[0])
    if config == "new":
        kw = dict(rule="length", max_attempts=None, fit={}, max_seconds_per_text=cap)
    elif config == "today":
        kw = dict(rule="fixed", max_attempts=1, fit={})
    else:
        kw = dict(rule="fixed", max_attempts=1, fit=hand_flags(mode, n))
    t0 = time.perf_counter()
    res = encode_texts(lm, texts, mode=mode, n_mem=1, batch_size=batch_size, log=log, **kw)
    wall = time.perf_counter() - t0
    exact = sum(r.exact for r in res)
    return {"mode": mode, "config": config, "n_tokens": n, "texts": len(res), "exact": exact,
            "exact_rate": round(exact / len(res), 4), "mean_seconds_per_text": round(sum(r.seconds for r in res) / len(res), 1),
            "mean_steps": round(sum(r.steps for r in res) / len(res), 1), "wall_seconds": round(wall, 1),
            "fit": kw.get("fit"), "rule": kw["rule"], "max_attempts": kw["max_attempts"],
            "attempts": [len(r.attempts) for r in res], "stop": [r.stop_reason for r in res],
            "decoded_accuracy": [round(r.decoded_accuracy, 4) for r in res],
            "steps": [r.steps for r in res], "seconds": [round(r.seconds, 1) for r in res]}


def calibrate_from(files: list[str], out: str) -> int:
    """Merge the 'new' cells of earlier --json-out files into a calibration (each stamped with its file's date)."""
    from scalerec.llm.estimate import write_calibration

    for f in files:
        d = json.loads(Path(f).read_text().strip().splitlines()[-1])
        cells = [c for c in d.get("cells", []) if c["config"] == "new"]
        when = d.get("date") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(Path(f).stat().st_mtime))
        write_calibration(out, d["model"], cells, source=f"benchmarks/llm_defaults.py, {len(cells)} cell(s) of {Path(f).name}, "
                          f"{d['threads']} thread(s), held-out passages {d['passages']}, load average at start "
                          f"{[round(x, 1) for x in d['load_average_start']]}", date=when)
    print(json.dumps({"calibration": out, "from": files}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--modes", default="one-step,ar")
    ap.add_argument("--lengths", default="16,32,48,64")
    ap.add_argument("--passages", type=int, default=20, help="held-out passages per length")
    ap.add_argument("--first-passage", type=int, default=0)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated of {', '.join(CONFIGS)}")
    ap.add_argument("--heldout-start", type=int, default=HELDOUT_START)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seconds-per-text", type=float, default=None, help="the new defaults' cost cap (default none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--text", default=None, help=f"default {TEXT}")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--calibration-out", default=None,
                    help="write the new defaults' figures per (mode, length) as an `encode --estimate` calibration")
    ap.add_argument("--calibration-from", nargs="+", default=None, metavar="JSON",
                    help="with --calibration-out: fit nothing, take the 'new' cells of these --json-out files")
    args = ap.parse_args(argv)
    if args.calibration_from:
        if not args.calibration_out:
            ap.error("--calibration-from needs --calibration-out")
        return calibrate_from(args.calibration_from, args.calibration_out)
    text = Path(args.text) if args.text else TEXT
    if not text.is_file():
        ap.error(f"{text}: no such file (--text)")
    if args.quick:
        args.lengths, args.passages, args.configs = "8", 2, "new,today"
    modes = args.modes.split(",")
    configs = args.configs.split(",")
    bad = sorted(set(configs) - set(CONFIGS)) + sorted(set(modes) - {"one-step", "ar"})
    if bad:
        ap.error(f"unknown configs/modes {bad}")
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    from scalerec.llm import load_causal_lm

    t_all = time.perf_counter()
    lm = load_causal_lm(args.model, dtype="float32", device="cpu")
    ids = lm.encode(text.read_text())
    figures = {"model": args.model, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "text": text.name, "text_tokens": len(ids), "threads": args.threads,
               "quick": args.quick, "heldout_start": args.heldout_start, "heldout_stride": HELDOUT_STRIDE,
               "passages": list(range(args.first_passage, args.first_passage + args.passages)),
               "tuning_regions": TUNING_REGIONS, "load_average_start": os.getloadavg(), "cells": []}

    def save():
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(figures) + "\n")

    for mode in modes:
        for n in lengths:
            texts = heldout_passages(ids, args.first_passage + args.passages, n, args.heldout_start)[args.first_passage:]
            for config in configs:
                cell = run_cell(lm, mode, config, texts, args.batch_size, args.max_seconds_per_text, log)
                log(f"[{mode} N={n} {config}] exact {cell['exact']}/{cell['texts']}, "
                    f"{cell['mean_seconds_per_text']} s/text, {cell['mean_steps']} steps/text")
                figures["cells"].append(cell)
                save()
    figures["seconds"] = round(time.perf_counter() - t_all, 1)
    figures["load_average_end"] = os.getloadavg()
    if args.calibration_out:
        from scalerec.llm.estimate import write_calibration

        write_calibration(args.calibration_out, lm.name, [c for c in figures["cells"] if c["config"] == "new"],
                          source=" ".join(["benchmarks/llm_defaults.py"] + (argv or sys.argv[1:])))
    save()
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
