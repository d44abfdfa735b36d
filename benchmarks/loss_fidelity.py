"""How closely each approximate loss follows exact CE on a trained model (no training: one checkpoint).

    python benchmarks/loss_fidelity.py --checkpoint runs/beauty_demo/best
    python benchmarks/loss_fidelity.py --checkpoint CKPT --quick          # 1 batch, 4 settings (~1 minute)

For a few training batches of the checkpoint's dataset, the query states of the trained SASRec are scored with
exact CE and with each approximate loss (same batch, same seed). Reported per setting, averaged over batches:
``loss/ce`` (how much of the exact loss the approximation sees: sampled losses underestimate it when their
negatives miss softmax mass), and the cosine similarity of the gradients with respect to the query states
(``cos gH``) and to the item table (``cos gT``) with the exact ones. A setting whose gradients point away from
CE's trains toward a different model. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SETTINGS = [  # (loss, params)
    ("sce", {}),
    ("sce", {"bucket_size_y": 512}),
    ("rece", {}),
    ("rece", {"n_extra_chunks": 2}),
    ("rece", {"rounds": 3}),
    ("rece", {"n_extra_chunks": 3, "rounds": 2}),
    ("ce_sampled", {}),
    ("gbce", {}),
    ("bce", {}),
]
QUICK = [("sce", {}), ("rece", {}), ("rece", {"rounds": 3}), ("ce_sampled", {})]


def query_states(ckpt_path: str, n_batches: int, batch_size: int, seed: int):
    from scalerec.data.batching import iterate_batches
    from scalerec.data.source import dataset_from_config
    from scalerec.train.checkpoint import load_checkpoint

    if not os.path.isdir(ckpt_path):
        raise SystemExit(f"--checkpoint {ckpt_path}: no such directory (train one first, e.g. `scalerec train "
                         f"launch/configs/beauty_demo.yaml`, and pass its best/)")
    model, cfg, _ = load_checkpoint(ckpt_path)
    ds = dataset_from_config(cfg)
    batches = iterate_batches(ds.train, batch_size, int(cfg.model.maxlen), np.random.default_rng(seed))
    H, Y = [], []
    with torch.no_grad():
        for _, (x, y) in zip(range(n_batches), batches):
            m = y > 0
            H.append(model.encode(x)[m])
            Y.append(y[m])
    return H, Y, model.item_table.detach().clone(), os.path.basename(str(cfg.data.path))


def loss_and_grads(name, params, H, Y, table, seed):
    from scalerec.losses import get_loss

    out = []
    for h, y in zip(H, Y):
        hh, t = h.clone().requires_grad_(True), table.clone().requires_grad_(True)
        torch.manual_seed(seed)
        loss = get_loss(name, **params)(hh, t, y)
        loss.backward()
        out.append((float(loss), hh.grad.flatten(), t.grad.flatten()))
    return out


def parse_settings(text: str) -> list[tuple[str, dict]]:
    """``"rece:n_buckets=64,rounds=2;sce"`` -> ``[("rece", {"n_buckets": 64, "rounds": 2}), ("sce", {})]``."""
    from scalerec.losses import get_loss
    from scalerec.overrides import parse_key_values

    out = []
    for item in filter(None, (t.strip() for t in text.split(";"))):
        name, _, rest = item.partition(":")
        params = parse_key_values(filter(None, (t.strip() for t in rest.split(","))), f"--settings {item!r}:")
        get_loss(name.strip(), **params)  # unknown loss or parameter: the registry's own clear error
        out.append((name.strip(), params))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a scalerec checkpoint directory (OUTPUT_DIR/best)")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="1 batch, 4 settings")
    ap.add_argument("--settings", default=None,
                    help="settings to compare instead of the built-in list, ';'-separated, each LOSS or "
                         "LOSS:key=value,key=value (e.g. 'rece:n_buckets=64,rounds=2;sce:bucket_size_y=512')")
    args = ap.parse_args(argv)
    settings = parse_settings(args.settings) if args.settings else (QUICK if args.quick else SETTINGS)
    torch.set_num_threads(args.threads)
    n_batches = 1 if args.quick else args.batches
    H, Y, table, data = query_states(args.checkpoint, n_batches, args.batch_size, args.seed)
    ref = loss_and_grads("ce", {}, H, Y, table, args.seed)
    rows = []
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
    print(f"data {data}, {n_batches} batches of {args.batch_size} sequences ({sum(len(y) for y in Y)} query rows), "
          f"exact CE loss {np.mean([r[0] for r in ref]):.3f}", file=sys.stderr)
    print("| loss | params | loss/ce | cos gH | cos gT |\n|---|---|---|---|---|", file=sys.stderr)
    for name, params in settings:
        g = loss_and_grads(name, params, H, Y, table, args.seed)
        row = {"loss": name, "params": params,
               "loss_over_ce": float(np.mean([a[0] / r[0] for a, r in zip(g, ref)])),
               "cos_grad_hidden": float(np.mean([cos(a[1], r[1]) for a, r in zip(g, ref)])),
               "cos_grad_table": float(np.mean([cos(a[2], r[2]) for a, r in zip(g, ref)]))}
        rows.append(row)
        print(f"| {name} | {params or 'defaults'} | {row['loss_over_ce']:.3f} | {row['cos_grad_hidden']:.3f} | "
              f"{row['cos_grad_table']:.3f} |", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "loss_fidelity", "checkpoint": args.checkpoint, "data": data,
                      "query_rows": sum(len(y) for y in Y), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
