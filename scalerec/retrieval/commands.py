"""``scalerec recommend CHECKPOINT --users FILE --k 10 [--index IVF…] --output out.{parquet,jsonl}``.

Reads users' histories from FILE (any interaction format ``scalerec`` reads: ``user_seq``, ``user_item``,
MovieLens, CSV/Parquet with ``user, item[, timestamp]``; original item ids), encodes each history with the
checkpoint's model, searches the top-``k`` items through a MIPS index (``exact`` by default; a FAISS factory
string such as ``IVF1024,Flat`` with ``--nprobe``, ``HNSW32`` with ``--efSearch``, or ``bucket``), excluding
the user's history unless ``--include-history``, and writes one row per user: ``user``, ``items`` (original
ids, best first) and ``scores``. Items unknown to the checkpoint are dropped from the histories; users left
with no known item are skipped (counted in the summary).
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def _write(path: str, users: list, items: np.ndarray, scores: np.ndarray) -> None:
    tmp = path + ".tmp"
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        k = items.shape[1]
        flat_i = pa.array(items.reshape(-1), pa.int64())
        flat_s = pa.array(scores.reshape(-1).astype(np.float32), pa.float32())
        offsets = pa.array(np.arange(0, items.size + 1, k, dtype=np.int32))
        table = pa.table({
            "user": pa.array(np.asarray(users, np.int64)),
            "items": pa.ListArray.from_arrays(offsets, flat_i),
            "scores": pa.ListArray.from_arrays(offsets, flat_s),
        })
        pq.write_table(table, tmp)
    else:
        with open(tmp, "w") as fh:
            for u, it, sc in zip(users, items.tolist(), scores.tolist()):
                fh.write(json.dumps({"user": int(u), "items": it, "scores": [round(s, 6) for s in sc]}) + "\n")
    os.replace(tmp, path)


def recommend(
    checkpoint: str,
    users_file: str,
    output: str,
    k: int = 10,
    index: str = "exact",
    fmt: str | None = None,
    include_history: bool = False,
    batch_size: int = 1024,
    **index_params,
) -> dict:
    """Top-``k`` recommendations for the users of ``users_file``; returns the summary dict."""
    import torch

    from scalerec.data.batching import pad_left
    from scalerec.data.dataset import _user_sequences
    from scalerec.data.readers import read_interactions
    from scalerec.retrieval import make_index
    from scalerec.train.checkpoint import load_checkpoint

    if str(index).strip().lower() not in ("exact", "bucket"):
        from scalerec.extras import require

        require("faiss", "faiss", command="recommend")
    if not (output.endswith(".parquet") or output.endswith(".jsonl")):
        raise ValueError(f"--output must end with .parquet or .jsonl, got {output!r}")
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    t_start = time.perf_counter()
    model, cfg, payload = load_checkpoint(checkpoint)
    item_ids = np.asarray(payload["item_ids"], np.int64)  # internal id i + 1 <-> item_ids[i]
    C = len(item_ids)
    if k > C:
        raise ValueError(f"--k {k} exceeds the checkpoint's catalog size C={C}")
    order = np.argsort(item_ids, kind="stable")
    sorted_ids = item_ids[order]

    inter = read_interactions(users_file, fmt)
    users, hists, unknown, skipped = [], [], 0, 0
    for u, items, _ts in _user_sequences(inter):
        pos = np.searchsorted(sorted_ids, items)
        pos_c = np.minimum(pos, C - 1)
        known = sorted_ids[pos_c] == items
        unknown += int((~known).sum())
        internal = order[pos_c[known]] + 1
        if len(internal) == 0:
            skipped += 1
            continue
        users.append(int(u))
        hists.append(internal.astype(np.int64))
    if not users:
        raise ValueError(f"{users_file}: no user has an item known to the checkpoint {checkpoint}")

    table = model.item_table.detach()
    t0 = time.perf_counter()
    idx = make_index(index, table, **index_params)
    build_s = time.perf_counter() - t0
    all_i, all_s, search_s = [], [], 0.0
    with torch.no_grad():
        for s in range(0, len(hists), batch_size):
            h = hists[s : s + batch_size]
            q = model.last_hidden(torch.from_numpy(pad_left(h, model.maxlen)))
            t1 = time.perf_counter()
            sc, ids = idx.search(q, k, exclude=None if include_history else h)
            search_s += time.perf_counter() - t1
            all_i.append(ids.cpu().numpy())
            all_s.append(sc.float().cpu().numpy())
    ids = np.concatenate(all_i)
    scores = np.concatenate(all_s)
    # back to original ids; a slot the index could not fill (-1) stays -1
    orig = np.where(ids > 0, item_ids[np.maximum(ids, 1) - 1], -1)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    _write(output, users, orig, scores)
    return {
        "users": len(users), "skipped_users": skipped, "unknown_items": unknown, "k": k, "index": index,
        "index_params": index_params, "exclude_history": not include_history, "output": output,
        "empty_slots": int((ids < 1).sum()), "index_build_seconds": round(build_s, 4),
        "search_seconds": round(search_s, 4), "seconds": round(time.perf_counter() - t_start, 3),
    }


def cmd_recommend(args) -> int:
    params = {}
    if args.nprobe is not None:
        params["nprobe"] = args.nprobe
    if args.efSearch is not None:
        params["efSearch"] = args.efSearch
    summary = recommend(args.checkpoint, args.users, args.output, k=args.k, index=args.index, fmt=args.format,
                        include_history=args.include_history, batch_size=args.batch_size, **params)
    if summary["skipped_users"] or summary["unknown_items"]:
        print(f"scalerec recommend: {summary['unknown_items']} unknown item(s) dropped, "
              f"{summary['skipped_users']} user(s) with no known item skipped", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['users']} users x top-{args.k} ({args.index}) -> {args.output} in {summary['seconds']:.1f}s")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("recommend", help="top-k recommendations for users' histories, through a MIPS index")
    p.add_argument("checkpoint", help="a scalerec checkpoint directory (e.g. runs/beauty_demo/best)")
    p.add_argument("--users", required=True, help="users' histories: user_seq / user_item / csv / parquet file")
    p.add_argument("--format", default=None, help="format of --users (default: detect from the file)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--index", default="exact",
                   help="exact (default), bucket, or a FAISS factory string: Flat, IVF1024,Flat, IVF1024,PQ16, HNSW32")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists visited per query")
    p.add_argument("--efSearch", type=int, default=None, help="HNSW search breadth")
    p.add_argument("--include-history", action="store_true", help="do not exclude the items a user already has")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--output", required=True, help="out.parquet or out.jsonl")
    p.add_argument("--json", action="store_true", help="print one JSON summary last")
    p.set_defaults(func=cmd_recommend)
