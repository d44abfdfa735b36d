"""``scalerec plan``: bytes per rank of a scale-out run, before running it.

The model adds, per rank: the table shard (C/W rows x d x storage bytes), its row-sparse optimizer state
(row-wise Adagrad: one fp32 per row; lazy Adam: two fp32 per element), the dense SASRec part under DeepSpeed
(fp32 params, grads and Adam moments, divided by W as the ZeRO stage says), activations of the local batch,
the loss workspace (what the distributed loss allocates: all-gathered queries, score tiles, candidate rows,
the local gradient of a full CE), the communication buffers, and the runtime (Python + torch + Ray worker +
DeepSpeed, measured). ``benchmarks/scaleout.py`` checks it against the measured peak RSS at 10^6 and 10^7.
"""
from __future__ import annotations

import json
import math

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
# Measured (benchmarks/scaleout.py machine, C = 10^4 so the table is negligible): a Ray Train worker's RSS with
# torch, Ray and DeepSpeed imported and the engine initialised; before the engine exists (when the table is
# initialised) it is smaller.
RUNTIME_BYTES = 540 * 2**20
RUNTIME_BEFORE_ENGINE_BYTES = 250 * 2**20
INIT_ROWS = 1 << 18  # rows initialised at a time (sharded_table._INIT_BLOCK), plus one generator block


def dense_params(dim: int, maxlen: int, blocks: int) -> int:
    per_block = (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * (dim * dim + dim) + 4 * dim
    return blocks * per_block + maxlen * dim + 2 * dim


def plan(items: int, dim: int = 64, workers: int = 1, loss: str = "sce", dtype: str = "bf16",
         optimizer: str = "adagrad", batch_size: int = 128, maxlen: int = 200, blocks: int = 2, heads: int = 1,
         zero_stage: int = 2, n_buckets: int = 64, bucket_size_x: int = 64, bucket_size_y: int = 256,
         num_negatives: int = 256, tile: int = 65536, seq_fill: float = 1.0, ce_tile: int = 4096) -> dict:
    """Bytes per rank by component, for the largest shard (rank 0)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if workers < 1 or workers > items:
        raise ValueError(f"--workers must lie in 1..items ({items}), got {workers}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"--zero-stage must be 0, 1, 2 or 3, got {zero_stage}")
    rows = math.ceil(items / workers)
    out: dict[str, int] = {}
    out["table"] = rows * dim * DTYPE_BYTES[dtype]
    out["optimizer_state"] = {"adagrad": 4 * rows, "adam": 8 * rows * dim, "sgd": 0}[optimizer]
    P = dense_params(dim, maxlen, blocks)
    shard = lambda stage: 1.0 / workers if zero_stage >= stage else 1.0  # noqa: E731
    out["dense_model"] = int(4 * P * shard(3) + 4 * P * shard(2) + 8 * P * shard(1))
    b = math.ceil(batch_size / workers)
    n_local = int(b * maxlen * seq_fill)  # real positions on this rank
    N = n_local * workers  # all-gathered queries
    # per block: ~14 [b, L, d] fp32 tensors kept for backward + attention probabilities [b, h, L, L] (x2)
    out["activations"] = 4 * (b * maxlen * dim * (14 * blocks + 6) + 2 * blocks * b * heads * maxlen * maxlen)
    t = min(tile, rows)
    if loss == "ce":
        t = min(ce_tile, rows)
        work = N * dim * 4 * 4 + N * t * 4 * 3 + rows * dim * 4  # H, grads, rows; logits/exp tiles; local grad
    elif loss == "sce":
        k = n_buckets * bucket_size_y
        mine = math.ceil(n_buckets / workers)  # the bucketed CE runs on this rank's buckets only
        work = (N * dim * 4 * 4 + n_buckets * t * 4 * 3 + mine * bucket_size_x * bucket_size_y * 4 * 4
                + (mine * bucket_size_y + N) * dim * 4 * 3 + workers * k * 12
                + t * dim * 4)  # the bf16 shard is converted one scan tile at a time inside the op
    elif loss == "ce_sampled":
        work = N * dim * 4 * 4 + N * num_negatives * (8 + 4 * 4) + (N * (num_negatives + 1)) * dim * 4 * 3
    else:
        raise ValueError(f"--loss must be ce, sce or ce_sampled for a row-sharded table, got {loss!r}")
    out["loss_workspace"] = int(work)
    out["communication"] = int(N * dim * 4 * 2 + 2 * b * maxlen * (dim * 4 + 8) * 2)
    n_init = min(INIT_ROWS, rows)  # transient, before training: fp32 rows, one generator block, the cast
    out["init_workspace"] = n_init * dim * (4 + DTYPE_BYTES[dtype]) + INIT_ROWS * dim * 4
    out["runtime"] = RUNTIME_BYTES
    steady = sum(v for k, v in out.items() if k != "init_workspace")
    init = out["table"] + out["optimizer_state"] + out["init_workspace"] + RUNTIME_BEFORE_ENGINE_BYTES
    out["total"] = max(steady, init)
    return out


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_plan(args) -> int:
    p = plan(args.items, args.dim, args.workers, args.loss, args.dtype, args.optimizer, args.batch_size,
             args.maxlen, args.blocks, args.heads, args.zero_stage, tile=args.tile)
    mem = args.memory_gb * 2**30 if args.memory_gb else None
    fits = None if mem is None else p["total"] * args.workers <= mem
    if args.json:
        print(json.dumps({"per_rank": p, "workers": args.workers, "all_ranks": p["total"] * args.workers,
                          "memory": mem, "fits": fits}))
        return 0
    print(f"C = {args.items:,} items x d = {args.dim}, W = {args.workers}, loss {args.loss}, table {args.dtype}, "
          f"optimizer {args.optimizer}, batch {args.batch_size} x {args.maxlen}")
    for k, v in p.items():
        print(f"  {k:<16} {fmt_bytes(v):>12}")
    print(f"  {'all ranks':<16} {fmt_bytes(p['total'] * args.workers):>12}")
    if mem is not None:
        print(f"fits in {args.memory_gb:g} GiB (all ranks on one machine): {'yes' if fits else 'NO'}")
    return 0


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="memory per rank of a row-sharded scale-out run")
    p.add_argument("--items", type=lambda s: int(float(s)), required=True, help="catalog size C (1e8 allowed)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--loss", default="sce", choices=["ce", "sce", "ce_sampled"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPE_BYTES))
    p.add_argument("--optimizer", default="adagrad", choices=["adagrad", "adam", "sgd"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--maxlen", type=int, default=200)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--tile", type=int, default=65536)
    p.add_argument("--memory-gb", type=float, default=0.0, help="say whether W ranks fit in this much memory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
