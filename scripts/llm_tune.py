"""Grid over FitConfig settings: steps to an exact fit (token accuracy 1.0) per passage, SmolLM2-135M on CPU.

    OMP_NUM_THREADS=1 python scripts/llm_tune.py --max-steps 300 --out benchmarks/results/llm_tune.jsonl \\
        --config '{}' --config '{"betas": [0.9, 0.99]}' --config '{"lr": 0.1}'

Every config fits the same texts (passages i of data/text/tinyshakespeare_head.txt starting at token
1000 + 500·i, cut to each of --lengths tokens) in ONE batch (the fitter keeps texts independent), so one
forward pass tests all of them. Each config appends one JSON line to --out: the config, per text its
passage, length, steps to exact (null when not reached) and best accuracy, and the wall time.
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

TEXT = ROOT / "data" / "text" / "tinyshakespeare_head.txt"


def tune_texts(lm, passages: list[int], lengths: list[int]) -> list[tuple[int, int, list[int]]]:
    """(passage, length, token ids) for every passage x length."""
    ids = lm.encode(TEXT.read_text())
    return [(i, n, ids[1000 + 500 * i: 1000 + 500 * i + n]) for i in passages for n in lengths]


def run_config(lm, texts, overrides: dict, mode: str, max_steps: int) -> dict:
    from scalerec.llm import FitConfig, fit_ar, fit_one_step

    kw = {"max_steps": max_steps, **overrides}
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    cfg = FitConfig(**kw)
    toks = [t for _, _, t in texts]
    t0 = time.perf_counter()
    res = fit_ar(lm, toks, n_mem=1, config=cfg) if mode == "ar" else fit_one_step(lm, toks, cfg)
    wall = time.perf_counter() - t0
    rows = [{"passage": i, "n": n, "steps": r.steps if r.accuracy == 1.0 else None,
             "accuracy": round(r.accuracy, 4), "restarts": r.restarts} for (i, n, _), r in zip(texts, res)]
    exact = [r["steps"] for r in rows if r["steps"] is not None]
    return {"mode": mode, "max_steps": max_steps, "config": overrides, "exact": len(exact), "texts": len(rows),
            "mean_steps_exact": round(sum(exact) / len(exact), 1) if exact else None,
            "max_steps_exact": max(exact) if exact else None, "wall_seconds": round(wall, 1), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", default=[], help="FitConfig overrides as JSON (repeatable)")
    ap.add_argument("--passages", default="0,1,2,3,4,5")
    ap.add_argument("--lengths", default="8,16")
    ap.add_argument("--mode", default="one-step", choices=["one-step", "ar"])
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--sink", default="bos", help="token in front of the fitted vectors: bos, none, or a token id")
    ap.add_argument("--out", default=None, help="append one JSON line per config")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from scalerec.llm import load_causal_lm

    sink = None if args.sink == "none" else args.sink if args.sink == "bos" else int(args.sink)
    lm = load_causal_lm("smollm2", dtype="float32", device="cpu", sink=sink)
    texts = tune_texts(lm, [int(x) for x in args.passages.split(",")], [int(x) for x in args.lengths.split(",")])
    for c in args.config or ["{}"]:
        rec = run_config(lm, texts, json.loads(c), args.mode, args.max_steps)
        rec["sink"], rec["load_average"] = lm.sink_id, os.getloadavg()[0]
        line = json.dumps(rec)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
        cells = " ".join(f"{r['passage']}/{r['n']}:{r['steps'] if r['steps'] is not None else r['accuracy']}"
                         for r in rec["rows"])
        print(f"{c} -> exact {rec['exact']}/{rec['texts']}, mean {rec['mean_steps_exact']}, "
              f"max {rec['max_steps_exact']}, {rec['wall_seconds']} s | {cells}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
