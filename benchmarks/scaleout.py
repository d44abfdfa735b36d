"""Scale-out benchmark: row-sharded table memory, ZeRO-3 vs row-sharded peak, W=2 vs W=1 throughput with SCE,
the memory model against measurement, and the largest catalog trained on this machine.

    python benchmarks/scaleout.py --quick            # ~2-4 minutes (smaller catalogs; says which)
    python benchmarks/scaleout.py                    # C = 10^6 / 10^7 as in the issue
    python benchmarks/scaleout.py --only largest --largest 1e8   # the 10^8 run alone (needs ~15 GB)

Every training run goes through the one trainer (``scalerec.train.run.train`` on Ray Train workers — W = 1 too —
with DeepSpeed for the dense part at W > 1, the row-sharded table and the sharded loss) on the synthetic
Zipf/cluster catalog. The ZeRO-3
comparison runs two gloo processes with DeepSpeed ZeRO-3 holding the table as an ordinary ``nn.Embedding``
parameter, against the same dense model with the row-sharded table. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

GB = 1e9


def _cfg(items: float, workers: int, steps: int, out: str, name: str, **over):
    from scalerec.train.config import load_config

    spec = f"synthetic:items={int(items)},users=1000000,clusters={min(2000, int(items) // 50)},len=50,eval_users=256"
    ov = [f"data.path={spec}", f"trainer.workers={workers}", "trainer.epochs=1", f"trainer.max_steps_per_epoch={steps}",
          "trainer.batch_size=128", "model.maxlen=50", "model.dropout=0.2", "loss.name=sce",
          "loss.params.n_buckets=32", "loss.params.bucket_size_x=64", "loss.params.bucket_size_y=128",
          "loss.params.tile=8192", "eval.valid_max_cases=64", "eval.batch_size=64", "scaleout.test_max_cases=64",
          "scaleout.table.dtype=bf16", "scaleout.table.optimizer=adagrad", "scaleout.table.layout=snake",
          "trainer.threads=1", f"scaleout.ray.num_cpus={max(2, workers)}", f"output_dir={out}/{name}",
          "scaleout.table.sharded=true", "scaleout.ray.address=local",
          f"scaleout.ray.storage_path={out}/ray", f"scaleout.ray.name={name}", "trainer.progress=false"]
    ov += [f"{k}={v}" for k, v in over.items()]
    return load_config(os.path.join(REPO, "launch", "configs", "synthetic_1e7.yaml"), ov)


def run(items, workers, steps, out, name, log, **over):
    from scalerec.train.plan import plan
    from scalerec.train.run import train as run_distributed

    import shutil

    for d in (os.path.join(out, name), os.path.join(out, "ray", name)):  # a fresh run: Ray Train would resume
        shutil.rmtree(d, ignore_errors=True)                            # a finished one of the same name
    cfg = _cfg(items, workers, steps, out, name, **over)
    t = time.time()
    r = run_distributed(cfg)
    n = len(r["step_losses"])
    p = plan(int(items), 64, workers, str(cfg.loss.name), "bf16", "adagrad", int(cfg.trainer.batch_size), 50, 2, 1, 2,
             n_buckets=32, bucket_size_x=64,
             bucket_size_y=128, tile=8192)
    rec = {"items": int(items), "workers": workers, "loss": str(cfg.loss.name), "global_batch": r["global_batch"], "steps": n, "seconds_per_step": r["train_seconds"] / max(n, 1),
           "samples_per_s": r["global_batch"] * n / max(r["train_seconds"], 1e-9),
           "peak_rss_per_rank": r["peak_rss_per_rank"], "table_bytes": r["table_bytes"],
           "plan_total": p["total"], "wall_s": time.time() - t, "final_loss": r["final_loss"],
           "valid_ndcg10": r["valid"].get("NDCG@10"),
           "phase_s_per_step": {k: v / max(n, 1) for k, v in (r.get("phase_seconds") or {}).items()}}
    rec["plan_error"] = abs(p["total"] - max(rec["peak_rss_per_rank"])) / max(rec["peak_rss_per_rank"])
    log(f"C={int(items):.0e} W={workers}: {rec['seconds_per_step']:.3f} s/step, {rec['samples_per_s']:.1f} seq/s, "
        f"peak RSS/rank {[round(b / GB, 2) for b in rec['peak_rss_per_rank']]} GB, plan {p['total'] / GB:.2f} GB "
        f"(err {rec['plan_error']:.2f}); per step by phase (rank 0): "
        + ", ".join(f"{k} {v:.3f}" for k, v in rec["phase_s_per_step"].items()))
    return rec


# ------------------------------------------------------------------------------------------- ZeRO-3 vs sharded
def _watch_peak(path: str, every_s: float = 0.2) -> None:
    """Write this process's peak RSS to ``path`` every ``every_s`` (a daemon thread): if the OOM killer ends the
    process, the last value written is a measured lower bound of its peak."""
    import threading

    def loop():
        while True:
            with open(path + ".tmp", "w") as f:
                f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
            os.replace(path + ".tmp", path)
            time.sleep(every_s)

    threading.Thread(target=loop, daemon=True).start()


def _zero3_worker(rank, world, port, items, mode, steps, out_file):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    import deepspeed
    from omegaconf import OmegaConf

    from scalerec.losses import get_loss
    from scalerec.models.build import build_model
    from scalerec.models.sharded_table import ShardedItemTable

    _watch_peak(f"{out_file}.{rank}.live")
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = OmegaConf.create({"model": {"maxlen": 50, "hidden": 64, "num_blocks": 2, "num_heads": 1, "dropout": 0.0}})
    torch.manual_seed(0)
    C, B, L = int(items), 64, 50
    ds = {"train_micro_batch_size_per_gpu": B // world, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "overlap_comm": False, "stage3_param_persistence_threshold": 0},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    loss_fn = get_loss("ce_sampled", num_negatives=256)

    class WithTable(torch.nn.Module):  # the table as an ordinary parameter: ZeRO-3 partitions and gathers it
        def __init__(self, dense, table):
            super().__init__()
            self.dense, self.table = dense, table

        def forward(self, x, y):
            # every use of the table goes through the module, so ZeRO-3 gathers it (the whole C x d parameter)
            h = self.dense(x, self.table(x))
            m = y > 0
            h, t = h[m], y[m]
            neg = torch.randint(1, C + 1, (t.numel(), 256))
            rows = self.table(torch.cat([t.unsqueeze(1), neg], 1))  # [N, 1 + 256, d]
            logits = torch.einsum("nd,nkd->nk", h, rows)
            logits[:, 1:] = logits[:, 1:].masked_fill(neg == t.unsqueeze(1), float("-inf")) - math.log(256 / C)
            return torch.nn.functional.cross_entropy(logits, torch.zeros(t.numel(), dtype=torch.long))

    g = torch.Generator().manual_seed(rank)
    if mode == "zero3":
        dense = build_model(cfg, C, item_table=False)
        with deepspeed.zero.Init(config_dict_or_path=ds):  # the table is born partitioned (no full copy at init)
            table = torch.nn.Embedding(C + 1, 64)
        model = WithTable(dense, table)
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.Adagrad(params, lr=0.05),
                                          model_parameters=params, config=ds)
        for _ in range(steps):
            x = torch.randint(1, C + 1, (B // world, L), generator=g)
            loss = engine(x, torch.roll(x, -1, 1))
            engine.backward(loss)
            engine.step()
    else:
        dense = build_model(cfg, C, item_table=False)
        table = ShardedItemTable(C, 64, group=dist.new_group(backend="gloo"), dtype="fp32", optimizer="adagrad")
        params = [p for p in dense.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=dense, optimizer=torch.optim.Adam(params), model_parameters=params,
                                          config=ds)
        for _ in range(steps):
            x = torch.randint(1, C + 1, (B // world, L), generator=g)
            y = torch.roll(x, -1, 1)
            h = engine(x, table.lookup(x))
            m = y > 0
            torch.manual_seed(0)
            loss = loss_fn(h[m], table, y[m])
            engine.backward(loss * world)
            engine.step()
            table.step(grad_scale=1.0 / world)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump({"peak": peak}, f)
    dist.destroy_process_group()


def zero3_vs_sharded(items, out, log, steps=2):
    import torch.multiprocessing as mp

    res, killed = {}, []
    for mode in ("sharded", "zero3"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        f = os.path.join(out, f"z3_{mode}")
        for r in range(2):
            for suffix in ("", ".live"):
                if os.path.exists(f"{f}.{r}{suffix}"):
                    os.remove(f"{f}.{r}{suffix}")
        t = time.time()
        try:
            mp.spawn(_zero3_worker, args=(2, port, items, mode, steps, f), nprocs=2, join=True)
            res[mode] = max(json.load(open(f"{f}.{r}"))["peak"] for r in range(2))
        except mp.ProcessExitedException as exc:  # OOM-killed: the sampled peak is a lower bound of the real one
            live = [int(open(f"{f}.{r}.live").read()) for r in range(2) if os.path.exists(f"{f}.{r}.live")]
            if not live:
                raise
            res[mode] = max(live)
            killed.append(mode)
            log(f"{mode} C={int(items):.0e}: killed ({exc}); peak RSS/rank reached before that: "
                f"{res[mode] / GB:.2f} GB (a lower bound)")
            continue
        log(f"{mode} C={int(items):.0e}: peak RSS/rank {res[mode] / GB:.2f} GB ({time.time() - t:.0f}s)")
    return res["zero3"] / res["sharded"], res, killed


# ------------------------------------------------------------------------------------------- the scan's limit
def scan_probe(rows: int, n_b: int, k: int, tile: int, log, dim: int = 64) -> dict:
    """One rank's candidate scan (``bucket_topk`` over a bf16 shard of ``rows`` rows, converted tile by tile
    inside the op) against this machine's copy bandwidth and GEMM rate, measured in the same process."""
    import torch

    from scalerec.ops.bucket_topk import bucket_topk

    torch.manual_seed(0)
    shard = torch.empty(rows, dim, dtype=torch.bfloat16)
    for a in range(0, rows, 1 << 22):  # filled block by block: no fp32 copy of the shard
        shard[a: a + (1 << 22)] = torch.randn(min(1 << 22, rows - a), dim)
    dirs = torch.randn(n_b, dim)
    bucket_topk(dirs, shard[: 1 << 16], k, tile=tile)  # warm-up
    t = time.perf_counter()
    bucket_topk(dirs, shard, k, tile=tile)
    scan_s = time.perf_counter() - t
    src = torch.empty(1 << 28, dtype=torch.uint8).fill_(1)  # 256 MiB copy: the memory bandwidth probe
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = time.perf_counter()
    for _ in range(4):
        dst.copy_(src)
    copy_gbs = 4 * 2 * src.numel() / (time.perf_counter() - t) / GB  # read + write
    a_, b_ = torch.randn(n_b, dim), torch.randn(tile, dim)
    torch.mm(a_, b_.t())
    t, reps = time.perf_counter(), 200
    for _ in range(reps):
        torch.mm(a_, b_.t())
    gemm_tile = 2 * n_b * dim * tile * reps / (time.perf_counter() - t) / GB
    big = torch.randn(1024, 1024)
    torch.mm(big, big)
    t = time.perf_counter()
    for _ in range(4):
        torch.mm(big, big)
    gemm_peak = 4 * 2 * 1024 ** 3 / (time.perf_counter() - t) / GB
    out = {"scan_rows": rows, "scan_buckets": n_b, "scan_seconds": scan_s,
           "scan_gb_per_s": rows * dim * 2 / scan_s / GB, "scan_gflop_per_s": 2 * n_b * rows * dim / scan_s / GB,
           "copy_gb_per_s": copy_gbs, "gemm_gflop_per_s_scan_shape": gemm_tile, "gemm_gflop_per_s_1024": gemm_peak,
           "threads": torch.get_num_threads()}
    log(f"scan of {rows:.1e} bf16 rows x {n_b} buckets: {scan_s:.2f} s = {out['scan_gb_per_s']:.2f} GB/s, "
        f"{out['scan_gflop_per_s']:.1f} GFLOP/s; machine: copy {copy_gbs:.1f} GB/s, GEMM {gemm_tile:.1f} GFLOP/s at "
        f"the scan's tile shape, {gemm_peak:.1f} at 1024^3")
    return out


# ------------------------------------------------------------------------------------------- report
def write_report(fig: dict, runs: list, out_dir: str) -> None:
    """``scaleout.md`` (figures + one row per training run) and ``scaleout_memory.png`` (plan vs measured)."""
    lines = ["# Scale-out benchmark (`benchmarks/scaleout.py`)", "",
             "CPU, 2 cores (each worker one thread); timings are noisy; ratios are within one run.",
             "`samples_per_s_ratio_w2_w1`: each worker keeps a batch of 128 sequences (the data-parallel convention;",
             "the global batch grows with W); `..._same_global_batch`: 128 sequences split over the workers (strong",
             "scaling). `zero3_killed`: modes the OOM killer ended; their peak is the largest RSS sampled before the",
             "kill (every 0.2 s), so the ZeRO-3/sharded ratio is then a measured lower bound.", "",
             "| figure | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in fig.items()]
    lines += ["", "| loss | C | W | global batch | steps | s/step | seq/s | peak RSS/rank (GB) | plan (GB) | plan error | "
              "final loss | s/step by phase (rank 0) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        ph = ", ".join(f"{k} {v:.3f}" for k, v in r.get("phase_s_per_step", {}).items()) or "—"
        lines.append(f"| {r.get('loss', 'sce')} | {r['items']:.0e} | {r['workers']} | {r.get('global_batch', 128)} | {r['steps']} | "
                     f"{r['seconds_per_step']:.3f} | "
                     f"{r['samples_per_s']:.1f} | {max(r['peak_rss_per_rank']) / GB:.2f} | {r['plan_total'] / GB:.2f} | "
                     f"{r['plan_error']:.3f} | {r['final_loss']:.3f} | {ph} |")
    with open(os.path.join(out_dir, "scaleout.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    w2 = sorted((r for r in runs if r["workers"] == 2), key=lambda r: r["items"])
    if not w2:
        return
    fig_, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["items"] for r in w2]
    ax.plot(xs, [max(r["peak_rss_per_rank"]) / GB for r in w2], "o-", label="measured peak RSS / rank")
    ax.plot(xs, [r["plan_total"] / GB for r in w2], "s--", label="scalerec plan")
    ax.set_xscale("log")
    ax.set_xlabel("catalog size C (W = 2, bf16 table, row-wise Adagrad, SCE)")
    ax.set_ylabel("GB per rank")
    ax.legend()
    fig_.tight_layout()
    fig_.savefig(os.path.join(out_dir, "scaleout_memory.png"), dpi=120)


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "bench_scaleout"))
    ap.add_argument("--largest", type=float, default=0, help="also train this catalog size with W=2 (e.g. 1e8)")
    ap.add_argument("--largest-steps", type=int, default=20)
    ap.add_argument("--only", default="", help="comma list of parts: memory,throughput,zero3,largest,scan")
    ap.add_argument("--scan-rows", type=float, default=0, help="rows of the scan probe's shard (default 5e7; "
                    "--quick 5e6)")
    ap.add_argument("--zero3-items", type=float, default=0, help="catalog of the ZeRO-3 comparison (default 1e7)")
    ap.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results", "scaleout.json"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    log = lambda m: print(f"[scaleout] {m}", file=sys.stderr, flush=True)  # noqa: E731
    parts = set(args.only.split(",")) if args.only else {"memory", "throughput", "zero3", "scan"} | (
        {"largest"} if args.largest else set())
    small, big = (1e5, 1e6) if args.quick else (1e6, 1e7)
    steps = 4 if args.quick else 10
    prev = json.load(open(args.results)) if os.path.exists(args.results) and args.only else {}
    fig = dict(prev.get("figures", {}))
    runs = list(prev.get("runs", []))
    fig.update(quick=args.quick)

    import ray

    if parts - {"zero3", "scan"}:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    if "throughput" in parts or "memory" in parts:
        r1 = run(small, 1, steps, args.out, f"w1_{int(small)}", log)
        r2 = run(small, 2, steps, args.out, f"w2_{int(small)}", log)  # the same global batch (128): strong scaling
        # exact CE: every query against every item (N x C x d per step), so a smaller global batch and fewer steps
        ce_over = {"loss.name": "ce", "loss.params": "{}", "trainer.batch_size": 32}
        c1 = run(small, 1, 3, args.out, f"w1_{int(small)}_ce", log, **ce_over)
        c2 = run(small, 2, 3, args.out, f"w2_{int(small)}_ce", log, **ce_over)
        runs += [c1, c2]
        fig["ce_samples_per_s_ratio_w2_w1_same_global_batch"] = c2["samples_per_s"] / c1["samples_per_s"]
        # data-parallel convention: each worker keeps its batch of 128 sequences, the global batch grows with W
        r2w = run(small, 2, steps, args.out, f"w2_{int(small)}_b256", log, **{"trainer.batch_size": 256})
        rb = run(big, 2, steps, args.out, f"w2_{int(big)}", log)
        runs += [r1, r2, r2w, rb]
        fig["samples_per_s_ratio_w2_w1"] = r2w["samples_per_s"] / r1["samples_per_s"]
        fig["samples_per_s_ratio_w2_w1_same_global_batch"] = r2["samples_per_s"] / r1["samples_per_s"]
        fig["samples_per_s_batch_per_worker"] = 128
        fig["samples_per_s_catalog"] = int(small)
        fig["plan_error_max"] = max(r2["plan_error"], rb["plan_error"])
        fig["plan_catalogs"] = [int(small), int(big)]
        from scalerec.models.sharded_table import ShardedItemTable

        one = ShardedItemTable(int(big), 64, dtype="bf16", optimizer="adagrad")  # W = 1: the whole table
        w1 = sum(one.nbytes().values())
        del one
        fig["table_bytes_per_rank_ratio_w2_w1"] = sum(rb["table_bytes"].values()) / w1
        fig["table_bytes_catalog"] = int(big)
    if "zero3" in parts:
        zc = args.zero3_items or (big if not args.quick else small * 10)
        ratio, peaks, killed = zero3_vs_sharded(zc, args.out, log)
        fig["zero3_over_sharded_peak_ratio"] = ratio
        fig["zero3_killed"] = killed  # modes OOM-killed: their peak (and the ratio) is a measured lower bound
        fig["zero3_catalog"] = int(zc)
        fig["zero3_peak_rss_gb"] = {k: v / GB for k, v in peaks.items()}
        fig.pop("zero3_note", None)  # a note on an earlier, smaller comparison no longer applies
    if "scan" in parts:
        fig.update(scan_probe(int(args.scan_rows or (5e6 if args.quick else 5e7)), 16, 128, 8192, log))
    if "largest" in parts and args.largest:
        try:
            rl = run(args.largest, 2, args.largest_steps, args.out, f"w2_{int(args.largest)}", log,
                     **{"loss.params.n_buckets": 16, "eval.valid_max_cases": 32, "scaleout.test_max_cases": 32})
            runs.append(rl)
            fig.update(largest_catalog_trained=int(args.largest), seconds_per_step=rl["seconds_per_step"],
                       peak_rss_per_rank_gb=max(rl["peak_rss_per_rank"]) / GB, largest_steps=rl["steps"])
            for k in ("largest_catalog_failed", "largest_error"):  # an earlier failure at a size now trained
                if fig.get("largest_catalog_failed", 0) <= args.largest:
                    fig.pop(k, None)
        except Exception as exc:  # report what stopped it
            fig.update(largest_catalog_failed=int(args.largest), largest_error=str(exc)[:300])
    if ray.is_initialized():
        ray.shutdown()
    # one row per (C, W, global batch): a re-measured configuration replaces its earlier row
    key = lambda r: (r.get("loss", "sce"), r["items"], r["workers"], r.get("global_batch", 128))  # noqa: E731
    latest = {key(r): r for r in runs}
    runs = sorted(latest.values(), key=key)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump({"figures": fig, "runs": runs}, f, indent=1)
    write_report(fig, runs, os.path.dirname(args.results))
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
