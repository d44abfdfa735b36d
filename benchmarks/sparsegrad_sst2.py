"""SparseGrad vs MeProp vs LoRA vs full fine-tuning of MiniLM-L6 on SST-2 (and optionally SmolLM2 on Shakespeare).

Every (method, seed) run is a fresh subprocess, so its peak RSS (``ru_maxrss``, measured right after training,
before evaluation) is its own. All methods see the same model, fresh head (same seed), data order, steps and
batch size; SparseGrad and MeProp update k = density * out * in entries per MLP weight per step, LoRA gets the
rank with the same number of trainable MLP parameters. Speed is steps/s of the training loop (calibration
excluded, reported apart) and its ratio to LoRA's at the same seed, measured in the same run.

    python benchmarks/sparsegrad_sst2.py --quick            # ~2 minutes, 1 seed, tiny budget
    python benchmarks/sparsegrad_sst2.py --seeds 3          # the table of benchmarks/results/sparsegrad.md
    python benchmarks/sparsegrad_sst2.py --lm               # SmolLM2-135M on tiny Shakespeare: SparseGrad vs LoRA

Ends by printing one JSON line with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
METHODS = ("full", "lora", "meprop", "sparsegrad")


def worker(settings: dict) -> None:
    sys.path.insert(0, ROOT)
    from scalerec.peft.train import FinetuneSettings, run_finetune

    res = run_finetune(FinetuneSettings(**settings), progress=False)
    res.pop("settings", None)
    print("RESULT " + json.dumps(res, default=str), flush=True)


def run_one(settings: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(settings)], env=env,
                       capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"run {settings} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_s"] = time.time() - t0
    return res


def mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def summarize(runs: list[dict], metric: str) -> dict:
    out = {}
    by = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    lora = {r["seed"]: r for r in by.get("lora", [])}
    for m, rs in by.items():
        row = {"seeds": [r["seed"] for r in rs], "steps_per_s": mean([r["steps_per_s"] for r in rs]),
               "peak_rss_mb": mean([r["peak_rss_mb"] for r in rs]),
               "train_mem_mb": mean([r["peak_rss_mb"] - r["rss_after_load_mb"] for r in rs]),
               "trainable": rs[0].get("trainable"), "mlp_budget_per_step": rs[0].get("mlp_budget_per_step")}
        vals = [r[metric] for r in rs]
        row[metric] = mean(vals)
        row[metric + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        if metric == "heldout_loss_after":
            row["heldout_loss_before"] = mean([r["heldout_loss_before"] for r in rs])
        if "calibration_s" in rs[0]:
            row["calibration_s"] = mean([r["calibration_s"] for r in rs])
        if "lora_rank" in rs[0]:
            row["lora_rank"] = rs[0]["lora_rank"]
        if "cuda_train_peak_mb" in rs[0]:
            row["cuda_train_peak_mb"] = mean([r["cuda_train_peak_mb"] for r in rs])
            row["cuda_after_load_mb"] = mean([r["cuda_after_load_mb"] for r in rs])
        for key in ("tensor_peak_mb", "sparse_state_mb"):
            if key in rs[0]:
                row[key] = mean([r[key] for r in rs])
        if lora:
            pairs = [(r, lora[r["seed"]]) for r in rs if r["seed"] in lora]
            if "cuda_train_peak_mb" in rs[0]:
                row["cuda_peak_vs_lora"] = mean([a["cuda_train_peak_mb"] / b["cuda_train_peak_mb"] for a, b in pairs])
                row["cuda_beyond_model_vs_lora"] = mean(
                    [(a["cuda_train_peak_mb"] - a["cuda_after_load_mb"])
                     / (b["cuda_train_peak_mb"] - b["cuda_after_load_mb"]) for a, b in pairs])
            if "tensor_peak_mb" in rs[0] and "tensor_peak_mb" in pairs[0][1]:
                row["tensor_peak_vs_lora"] = mean([a["tensor_peak_mb"] / b["tensor_peak_mb"] for a, b in pairs])
            row["speed_vs_lora"] = mean([a["steps_per_s"] / b["steps_per_s"] for a, b in pairs])
            row["peak_rss_vs_lora"] = mean([a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in pairs])
            row["train_mem_vs_lora"] = mean([(a["peak_rss_mb"] - a["rss_after_load_mb"])
                                             / (b["peak_rss_mb"] - b["rss_after_load_mb"]) for a, b in pairs])
        out[m] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="1 seed, tiny budget (~2 minutes)")
    ap.add_argument("--lm", action="store_true", help="SmolLM2-135M on tiny Shakespeare (SparseGrad vs LoRA)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-list", default=None, help="comma-separated seeds to run instead of 0 .. --seeds - 1 "
                    "(e.g. 1,2: more seeds of a run, in another process)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (runs are sequential)")
    ap.add_argument("--grad-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="dtype of SparseGrad/MeProp weight-gradient GEMMs (auto: bfloat16 on a CPU where a timed "
                         "bf16 GEMM is >= 1.25x faster, else float32)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU memory: torch's allocator peak)")
    ap.add_argument("--model", default=None, help="model folder or alias (default: minilm; --lm: smollm2)")
    ap.add_argument("--max-length", type=int, default=None, help="SST-2 tokens per sentence (default 32)")
    ap.add_argument("--sparse-state", default="auto", choices=["auto", "compact", "dense"],
                    help="SparseGrad/MeProp Adam moments: compact entry set (auto) or dense")
    ap.add_argument("--unfused-optimizer", action="store_true",
                    help="SparseGrad/MeProp: run the lazy-Adam step's Python reference instead of the one-call op")
    ap.add_argument("--tensor-memory", action="store_true",
                    help="CPU: also measure the peak of live tensor memory over the last step (torch's profiler; the "
                         "CPU analogue of the GPU's allocator peak, without RSS's cache and fragmentation)")
    ap.add_argument("--out", default=None, help="also write all runs and the summary to this JSON file")
    args = ap.parse_args()
    if args.worker:  # its settings carry the grad dtype the parent chose
        worker(json.loads(args.worker))
        return 0
    if args.grad_dtype == "auto":
        sys.path.insert(0, ROOT)
        from scalerec.peft.config import fast_grad_dtype

        args.grad_dtype = fast_grad_dtype(args.device)

    if args.lm:
        methods = args.methods.split(",") if args.methods else ["lora", "sparsegrad"]
        base = dict(model=args.model or "smollm2", task="shakespeare", steps=args.steps or (3 if args.quick else 12),
                    batch_size=args.batch_size or 4, block=64, calibration_steps=2 if args.quick else 3,
                    eval_limit=8 if args.quick else 16, grad_dtype=args.grad_dtype, threads=args.threads)
        seeds = [0]
        metric = "heldout_loss_after"
    else:
        methods = args.methods.split(",") if args.methods else list(METHODS)
        if args.quick:
            base = dict(steps=args.steps or 10, batch_size=args.batch_size or 16, max_length=32,
                        calibration_steps=2, eval_limit=200)
            seeds = [0]
        else:
            base = dict(steps=args.steps or 40, batch_size=args.batch_size or 16, max_length=32,
                        calibration_steps=5)
            seeds = list(range(args.seeds))
            if args.seed_list:
                try:
                    seeds = [int(x) for x in args.seed_list.split(",")]
                except ValueError:
                    ap.error(f"--seed-list: comma-separated ints expected, got {args.seed_list!r}")
        base.update(model=args.model or "minilm", task="sst2", grad_dtype=args.grad_dtype, threads=args.threads)
        if args.max_length:
            base["max_length"] = args.max_length
        metric = "dev_accuracy"
    base["device"] = args.device
    base["sparse_state"] = args.sparse_state
    base["fused_optimizer"] = not args.unfused_optimizer
    if args.tensor_memory:
        base["tensor_memory"] = True
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: {m!r} is not one of {METHODS}")
    runs = []
    t0 = time.time()
    for seed in seeds:
        for m in methods:
            r = run_one(dict(base, method=m, seed=seed), args.threads)
            runs.append(r)
            extra = (f"acc={r['dev_accuracy']:.4f}" if metric == "dev_accuracy"
                     else f"loss {r['heldout_loss_before']:.4f}->{r['heldout_loss_after']:.4f}")
            if args.out:  # partial results survive an interrupted run
                with open(args.out, "w") as f:
                    json.dump({"partial": True, "settings": base, "runs": runs}, f, indent=1, default=str)
            gpu = f" cuda_peak={r['cuda_train_peak_mb']:.0f}MB" if "cuda_train_peak_mb" in r else ""
            gpu += f" tensor_peak={r['tensor_peak_mb']:.1f}MB" if "tensor_peak_mb" in r else ""
            print(f"[{time.time() - t0:6.0f}s] seed={seed} {m:10s} {extra} steps/s={r['steps_per_s']:.3f} "
                  f"peak_rss={r['peak_rss_mb']:.0f}MB{gpu} "
                  f"train_mem={r['peak_rss_mb'] - r['rss_after_load_mb']:.0f}MB", file=sys.stderr, flush=True)
    summary = summarize(runs, metric)
    out = {"benchmark": "sparsegrad_lm" if args.lm else "sparsegrad_sst2", "quick": args.quick,
           "settings": base, "seeds": seeds, "summary": summary, "wall_s": time.time() - t0}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**out, "runs": runs}, f, indent=1, default=str)
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
