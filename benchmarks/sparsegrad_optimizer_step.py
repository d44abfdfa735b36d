"""The host cost of one SparseGradOptimizer step: the one-call operator against its Python reference.

    python benchmarks/sparsegrad_optimizer_step.py [--device cuda] [--quick]

A tiny random BERT (6 layers, hidden 32, MLP 64: 12 rotated MLP linears, as in MiniLM-L6) whose arithmetic is
negligible, so the time of ``opt.step()`` is the cost of issuing its work: Python, dispatch and, on a GPU, kernel
launches. That is what bounds SparseGrad's step on a GPU (benchmarks/RESULTS.md section 3). Each variant (fused
or not, dense or compact moments) trains a fresh copy of the model on one fixed batch; the steps after a warm-up
are timed one by one (with a device synchronisation around each on a GPU) and the median is reported. Ends by
printing one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_model(device):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from scalerec.peft import SparseGradConfig, apply_sparsegrad, freeze_except_head

    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield {"input_ids": torch.randint(1, 60, (4, 8), generator=g).to(device),
                   "attention_mask": torch.ones(4, 8, dtype=torch.long, device=device),
                   "labels": torch.randint(0, 2, (4,), generator=g).to(device)}

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(cfg).to(device)
    apply_sparsegrad(model, SparseGradConfig(density=0.05, calibration_steps=2), calibration_data=batches(1))
    freeze_except_head(model)
    return model, next(batches(3))


def time_steps(fused: bool, layout: str, steps: int, warmup: int, device) -> float:
    import torch

    from scalerec.peft import SparseGradOptimizer

    model, batch = tiny_model(device)
    opt = SparseGradOptimizer(model, lr=1e-3, state_layout=layout, fused=fused)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        model(**batch).loss.backward()
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        opt.zero_grad(set_to_none=True)
    return 1e3 * statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer steps (seconds)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = args.steps or (50 if args.quick else 300)
    out = {"benchmark": "sparsegrad_optimizer_step", "device": args.device, "steps": steps, "threads": args.threads,
           "ms_per_step": {}}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    for layout in ("dense", "compact"):
        for fused in (True, False):
            name = f"{layout}_{'fused' if fused else 'reference'}"
            out["ms_per_step"][name] = time_steps(fused, layout, steps, 20, device)
            print(f"{name:18s} {out['ms_per_step'][name]:.3f} ms per optimizer step", file=sys.stderr)
    ms = out["ms_per_step"]
    out["fused_speedup"] = {lay: ms[f"{lay}_reference"] / ms[f"{lay}_fused"] for lay in ("dense", "compact")}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
