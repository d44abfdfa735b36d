"""Seconds per fitting step of SmolLM2-135M for the three step modes of the fitter (docs/llm.md):

* ``eager``: the active texts only, a host sync every step (the CPU default);
* ``static``: every text at fixed shapes, the host looks in every ``sync_every`` steps;
* ``graph``: the static step captured once in a CUDA graph and replayed (CUDA only; the GPU default).

    python benchmarks/llm_step_time.py --quick                 # CPU: ~2 min, one small case
    python benchmarks/llm_step_time.py --device cuda           # the GPU cases, all three modes

Each case fits B passages of N tokens (one-step: [e, m] per text; ar: one [mem] vector) for a fixed number of steps
with nothing allowed to finish (target accuracy above 1, restarts off), so every mode runs every text every step.
Seconds per step are the steady state: the wall time of all steps after the first ``sync_every`` (which hold the
warm-up and, for ``graph``, the capture) divided by their number. Ratios are against ``eager`` in the same run.
Ends with ONE JSON line of the figures.
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

from scalerec.llm import FitConfig, fit_ar, fit_one_step, load_causal_lm  # noqa: E402

TEXT = ROOT / "data" / "text" / "tinyshakespeare_head.txt"


def step_seconds(lm, mode: str, toks: list[list[int]], step_mode: str, steps: int, sync_every: int) -> dict:
    cfg = FitConfig(max_steps=steps, target_accuracy=2.0, restart_patience=None, step_mode=step_mode,
                    sync_every=sync_every)
    marks: list[tuple[int, float]] = []

    def on_step(step, **_):
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)
        marks.append((step, time.perf_counter()))

    t0 = time.perf_counter()
    res = (fit_one_step(lm, toks, cfg, on_step=on_step) if mode == "one-step"
           else fit_ar(lm, toks, n_mem=1, config=cfg, on_step=on_step))
    wall = time.perf_counter() - t0
    assert all(r.steps == steps for r in res), [r.steps for r in res]
    # steady state: from the first mark at or after sync_every steps to the last one
    first = next(i for i, (s, _) in enumerate(marks) if s >= sync_every)
    (s0, t_a), (s1, t_b) = marks[first], marks[-1]
    steady = (t_b - t_a) / (s1 - s0) if s1 > s0 else wall / steps
    return {"seconds_per_step": round(steady, 5), "wall_s": round(wall, 2),
            "accuracy": [round(r.accuracy, 4) for r in res]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="model directory, GGUF file or bundled name (smollm2)")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cases", default=None,
                    help="mode:B:N,... (default: GPU one-step:3:128,ar:4:80,one-step:32:64; CPU --quick one-step:2:16)")
    ap.add_argument("--steps", type=int, default=None, help="steps per fit (default: 200 on a GPU, 40 on a CPU, 20 with --quick)")
    ap.add_argument("--sync-every", type=int, default=None, help="FitConfig.sync_every (default: 25 on a GPU, 5 on a CPU)")
    ap.add_argument("--modes", default=None, help="step modes to time (default: eager,static[,graph on CUDA])")
    ap.add_argument("--quick", action="store_true", help="~2 minutes on a CPU: one small case, few steps")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on a CPU")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_causal_lm(args.model, dtype=args.dtype, device=args.device)
    cuda = lm.device.type == "cuda"
    modes = (args.modes or ("eager,static,graph" if cuda else "eager,static")).split(",")
    if "graph" in modes and not cuda:
        ap.error("--modes graph needs a CUDA device")
    default_cases = "one-step:3:128,ar:4:80,one-step:32:64" if cuda else (
        "one-step:2:16" if args.quick else "one-step:2:32,ar:2:32")
    steps = args.steps or (200 if cuda else (20 if args.quick else 40))
    sync_every = args.sync_every or (25 if cuda else 5)
    ids = lm.encode(TEXT.read_text())
    out = {"benchmark": "llm_step_time", "device": str(lm.device), "dtype": args.dtype, "steps": steps,
           "sync_every": sync_every, "torch": torch.__version__, "cases": []}
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(lm.device)
    else:
        out["threads"] = torch.get_num_threads()
    for case in (args.cases or default_cases).split(","):
        mode, B, N = case.split(":")
        B, N = int(B), int(N)
        toks = [ids[1000 + 500 * i: 1000 + 500 * i + N] for i in range(B)]
        row = {"mode": mode, "batch": B, "tokens": N}
        for sm in modes:
            row[sm] = step_seconds(lm, mode, toks, sm, steps, sync_every)
            print(f"{mode} B={B} N={N} {sm}: {row[sm]['seconds_per_step'] * 1e3:.1f} ms a step "
                  f"(wall {row[sm]['wall_s']} s for {steps} steps)", flush=True)
        base = row["eager"]["seconds_per_step"] if "eager" in row else None
        for sm in modes:
            if base and sm != "eager":
                row[f"{sm}_speedup_vs_eager"] = round(base / row[sm]["seconds_per_step"], 2)
        out["cases"].append(row)
    line = json.dumps(out)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
