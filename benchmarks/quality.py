"""Recommendation quality of each loss under one training budget (SASRec, full-ranking test metrics).

    python benchmarks/quality.py                       # Beauty, leave-one-out, ce / ce_sampled / bce / gbce
    python benchmarks/quality.py --losses ce,sce,rece --budget-s 900
    python benchmarks/quality.py --data ../shared/data/recsys/Video.txt --split temporal --losses ce,sce
    python benchmarks/quality.py --quick               # ~2 minutes: 600 Beauty users, tiny budget

Each loss trains with the same config (model, batch, lr, seed) and the same wall-clock budget (or epoch
cap), early-stopped on validation NDCG@10; the best checkpoint is scored on test. A loss's parameters can
be given as ``--param sce.bucket_size_y=128``. Writes a Markdown table (``--out``) and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scalerec.train.config import load_config  # noqa: E402
from scalerec.train.run import train  # noqa: E402

PAPER = {"Beauty.txt": {"source": "SCE paper, SASRec-SCE on Beauty", "NDCG@10": 0.0544, "HR@10": 0.0935}}


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "beauty", "Beauty.txt"))
    ap.add_argument("--split", default="loo", choices=["loo", "temporal"])
    ap.add_argument("--losses", default="ce,ce_sampled,bce,gbce")
    ap.add_argument("--budget-s", type=float, default=600.0, help="training wall-clock budget per loss")
    ap.add_argument("--epochs", type=int, default=200, help="epoch cap per loss")
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--param", action="append", default=[], help="LOSS.key=value loss parameter")
    ap.add_argument("--set", action="append", default=[], help="config override key=value for every run")
    ap.add_argument("--max-users", type=int, default=0, help="use only the first N users of a user_seq file")
    ap.add_argument("--quick", action="store_true", help="~2 minutes: 600 users, 20 s per loss")
    ap.add_argument("--out", default=None, help="Markdown file to write the table to")
    args = ap.parse_args(argv)
    if args.quick:
        args.max_users = args.max_users or 600
        args.budget_s = min(args.budget_s, 20.0)
    torch.set_num_threads(args.threads)

    data = args.data
    tmp = None
    if args.max_users:
        tmp = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        with open(data) as fh:
            for i, line in enumerate(fh):
                if i >= args.max_users:
                    break
                tmp.write(line)
        tmp.close()
        data = tmp.name

    params: dict[str, list[str]] = {}
    for p in args.param:
        name, _, kv = p.partition(".")
        params.setdefault(name, []).append(f"loss.params.{kv}")
    rows = []
    for name in [s.strip() for s in args.losses.split(",") if s.strip()]:
        out_dir = tempfile.mkdtemp(prefix=f"quality-{name}-")
        cfg = load_config(os.path.join(ROOT, "launch", "configs", "beauty_demo.yaml"), [
            f"data.path={data}", f"data.split={args.split}", f"loss.name={name}", f"output_dir={out_dir}",
            f"trainer.epochs={args.epochs}", f"trainer.patience={args.patience}", f"trainer.time_budget_s={args.budget_s}",
            f"trainer.threads={args.threads}", "trainer.progress=false", *params.get(name, []), *args.set])
        t0 = time.perf_counter()
        res = train(cfg, log=lambda *a: print(f"[{name}]", *a, file=sys.stderr, flush=True))
        wall = time.perf_counter() - t0
        row = {"loss": name, "params": dict(cfg.loss.params), "NDCG@10": res["test"]["NDCG@10"], "HR@10": res["test"]["HR@10"],
               "COV@10": res["test"]["COV@10"], "epochs": res["epochs"], "best_epoch": res["best_epoch"],
               "train_s": res["seconds"], "s_per_epoch": res["seconds"] / max(res["epochs"], 1), "wall_s": round(wall, 1)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    if tmp is not None:
        os.unlink(tmp.name)

    ref = PAPER.get(os.path.basename(args.data))
    base = next((r for r in rows if r["loss"] == "ce"), None)
    lines = [f"Data `{os.path.basename(args.data)}` ({args.split}{f', first {args.max_users} users' if args.max_users else ''}), "
             f"budget {args.budget_s:.0f} s / {args.epochs} epochs per loss, patience {args.patience}; machine: {machine()}.",
             "", "| loss | params | test NDCG@10 | test HR@10 | COV@10 | epochs (best) | train s | s/epoch | NDCG vs ce |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['NDCG@10'] / base['NDCG@10']:.3f}" if base and base["NDCG@10"] > 0 else "-"
        lines.append(f"| {r['loss']} | {r['params'] or ''} | {r['NDCG@10']:.4f} | {r['HR@10']:.4f} | {r['COV@10']:.3f} | "
                     f"{r['epochs']} ({r['best_epoch']}) | {r['train_s']:.0f} | {r['s_per_epoch']:.1f} | {rel} |")
    if ref:
        lines.append(f"| *{ref['source']}* | | {ref['NDCG@10']} | {ref['HR@10']} | | | | | |")
    table = "\n".join(lines)
    print(table, file=sys.stderr)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(f"\nCommand: `python benchmarks/quality.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{table}\n")
    print(json.dumps({"benchmark": "quality", "data": os.path.basename(args.data), "split": args.split,
                      "budget_s": args.budget_s, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
