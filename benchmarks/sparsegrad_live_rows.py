"""SparseGrad's CPU backward with and without the padding rows dropped: an interleaved A/B in one process.

    python benchmarks/sparsegrad_live_rows.py            # 8 rounds x 12 batches (~6 minutes, one thread)
    python benchmarks/sparsegrad_live_rows.py --quick    # 3 rounds x 6 batches (~2 minutes)

One LoRA and one SparseGrad MiniLM-L6 model (SST-2, batch 32, <= 64 tokens, float32 weight-gradient GEMMs, one
thread) train on the same fixed batches. Each round times LoRA, SparseGrad with the backward's old row rule (drop
the all-zero rows of grad_y only when at most 1/4 are live: a classifier's last MLP) and with the current one (at
most 7/8 live: the padding of every layer), by switching ``scalerec.ops.sparse_grad._LIVE_ROWS_DROP``; the rounds
interleave the three so that the machine's drift hits all of them alike. Reports the median ms per step and the
speed ratios against LoRA, and ends by printing one JSON line.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds of 6 batches")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--batches", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="minilm")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 8)
    n_batches = args.batches or (6 if args.quick else 12)

    import torch

    import scalerec.ops.sparse_grad as sg_ops
    from scalerec.peft.data import classification_batches, read_sst2
    from scalerec.peft.train import FinetuneSettings, _load, setup_method

    torch.set_num_threads(args.threads)

    def build(method: str):
        s = FinetuneSettings(method=method, model=args.model, device="cpu", batch_size=32, max_length=64,
                             calibration_steps=5, grad_dtype="float32", threads=args.threads)
        torch.manual_seed(0)
        model, tok = _load(s)
        xs, ys = read_sst2("train")
        batches = list(itertools.islice(classification_batches(tok, xs, ys, 32, 0, 64), n_batches))
        model, opt, _ = setup_method(s, model, classification_batches(tok, xs, ys, 32, 1000, 64))
        model.train()

        def run() -> float:
            t0 = time.perf_counter()
            for b in batches:
                model(**b).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return 1e3 * (time.perf_counter() - t0) / len(batches)

        live = sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["attention_mask"].numel() for b in batches)
        return run, live

    lora, _ = build("lora")
    sparsegrad, live_fraction = build("sparsegrad")
    current = sg_ops._LIVE_ROWS_DROP
    configs = [("lora", lora, None), ("sparsegrad_quarter", sparsegrad, 0.25), ("sparsegrad", sparsegrad, current)]
    lora()  # warm-up: allocator, the compact state's first growth
    sparsegrad()
    times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    try:
        for r in range(rounds):
            for name, fn, drop in configs:
                if drop is not None:
                    sg_ops._LIVE_ROWS_DROP = drop
                times[name].append(fn())
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.0f} ms" for n, t in times.items()),
                  file=sys.stderr, flush=True)
    finally:
        sg_ops._LIVE_ROWS_DROP = current
    med = {n: statistics.median(t) for n, t in times.items()}
    out = {"benchmark": "sparsegrad_live_rows", "rounds": rounds, "batches": n_batches, "threads": args.threads,
           "live_token_fraction": live_fraction, "median_step_ms": med,
           "speed_vs_lora": {n: med["lora"] / m for n, m in med.items()},
           "live_rows_drop": {"sparsegrad_quarter": 0.25, "sparsegrad": current}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
