"""MIPS retrieval benchmark: FAISS Flat / IVF-Flat / IVF-PQ / HNSW and ExactIndex on a synthetic table.

The table ``[C+1, d]`` mimics trained item embeddings: items around ``clusters`` random centres with
per-item noise (``--noise``) and log-normal norms (``--norm-sigma``; popular items have larger norms),
queries near random centres. Large norm spread makes MIPS easy for every method (the top items are the
longest vectors); the defaults keep it small.
For every index: build time, queries/s for ``--queries`` queries (top-``k``), recall@k against the exact
top-k (``ExactIndex``), and the memory the index holds. IVF and HNSW are swept over ``nprobe`` /
``efSearch`` to give a recall-vs-QPS curve. Writes a Markdown table (``--md``) and a PNG plot (``--plot``)
and prints one JSON line with all figures last.

    python benchmarks/retrieval.py --quick           # C = 1e5, ~1-2 minutes on 2 cores
    python benchmarks/retrieval.py                   # C = 1e6, d = 64, 4096 queries
    python benchmarks/retrieval.py --C 10000000 --skip hnsw,ivfpq   # 10^7 (memory: ~3x the table)
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import sys
import time

import faiss
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from scalerec.retrieval import BucketIndex, ExactIndex, FaissIndex  # noqa: E402


def synthetic_table(C: int, d: int, clusters: int, seed: int, noise: float = 1.0, norm_sigma: float = 0.1,
                    chunk: int = 1 << 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    table = torch.empty(C + 1, d)
    table[0] = 0
    for lo in range(1, C + 1, chunk):  # in chunks: no full-size temporaries at 10^7
        hi = min(C + 1, lo + chunk)
        n = hi - lo
        a = torch.randint(0, clusters, (n,), generator=g)
        x = centres[a] + noise * torch.randn(n, d, generator=g)
        x *= torch.exp(norm_sigma * torch.randn(n, 1, generator=g)) / d ** 0.5
        table[lo:hi] = x
    return table


def synthetic_queries(n: int, d: int, clusters: int, seed: int, noise: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)  # the same centres (same seed) as the table
    g2 = torch.Generator().manual_seed(seed + 1)
    a = torch.randint(0, clusters, (n,), generator=g2)
    return centres[a] + noise * torch.randn(n, d, generator=g2)


def recall_at_k(ids: torch.Tensor, ref: torch.Tensor) -> float:
    k = ref.size(1)
    hits = (ids.unsqueeze(2) == ref.unsqueeze(1)).any(2).sum()
    return float(hits) / (ref.size(0) * k)


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed_search(index, q, k, repeats=1):
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = index.search(q, k)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="C=1e5, 1024 queries, short sweeps (~1-2 min)")
    ap.add_argument("--C", type=int, default=None, help="catalog size (default 1e6; 1e5 with --quick)")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--queries", type=int, default=None, help="default 4096 (1024 with --quick)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clusters", type=int, default=None, help="default C / 1000")
    ap.add_argument("--noise", type=float, default=1.5, help="item/query spread around the centres (centres ~ N(0, I))")
    ap.add_argument("--norm-sigma", type=float, default=0.1, help="log-normal spread of the item norms")
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists (default sqrt(C) rounded to a power of 2)")
    ap.add_argument("--pq", type=int, default=16, help="PQ sub-quantizers m (bytes per code)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of rows to skip: flat,ivf,ivfpq,hnsw,bucket")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--md", default=None, help="write the Markdown table here")
    ap.add_argument("--plot", default=None, help="write the recall-vs-QPS PNG here")
    args = ap.parse_args(argv)

    C = args.C or (100_000 if args.quick else 1_000_000)
    nq = args.queries or (1024 if args.quick else 4096)
    d, k = args.d, args.k
    clusters = args.clusters or max(10, C // 1000)
    nlist = args.nlist or int(2 ** round(math.log2(C ** 0.5)))
    skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    t0 = time.perf_counter()
    table = synthetic_table(C, d, clusters, args.seed, args.noise, args.norm_sigma)
    q = synthetic_queries(nq, d, clusters, args.seed, args.noise)
    print(f"table [{C + 1}, {d}] ({table.numel() * 4 / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f}s; "
          f"{nq} queries, k={k}, threads={args.threads}, nlist={nlist}", file=sys.stderr)

    rows = []

    def record(name, params, build_s, search_s, recall, mem_bytes, note=""):
        row = {"index": name, "params": params, "build_s": round(build_s, 3), "search_s": round(search_s, 4),
               "qps": round(nq / search_s, 1), "recall_at_k": round(recall, 4), "memory_mb": round(mem_bytes / 2**20, 1),
               "note": note}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    # exact: the ground truth and a row of its own (searches the table in place: no extra memory)
    t0 = time.perf_counter()
    exact = ExactIndex(table)
    b = time.perf_counter() - t0
    s, (ref_s, ref) = timed_search(exact, q, k)
    record("ExactIndex", "tile=16384", b, s, 1.0, exact.memory_bytes(), "torch tiled matmul + running top-k")

    def bench_faiss(name, factory, sweep_key=None, sweep=(None,), **kw):
        gc.collect()
        rss0 = rss_mb()
        t0 = time.perf_counter()
        idx = FaissIndex(factory, table, **kw)
        build = time.perf_counter() - t0
        mem = idx.memory_bytes()
        for v in sweep:
            if sweep_key:
                idx.set_params(**{sweep_key: v})
            s, (_, ids) = timed_search(idx, q, k)
            record(name, f"{factory}" + (f" {sweep_key}={v}" if sweep_key else ""), build, s,
                   recall_at_k(ids, ref), mem, f"rss +{rss_mb() - rss0:.0f} MiB")
        del idx
        gc.collect()

    if "flat" not in skip:
        bench_faiss("Flat", "Flat")
    if "ivf" not in skip:
        bench_faiss("IVF-Flat", f"IVF{nlist},Flat", "nprobe", (1, 4, 16, 64) if not args.quick else (1, 8, 32))
    if "ivfpq" not in skip:
        bench_faiss("IVF-PQ", f"IVF{nlist},PQ{args.pq}", "nprobe", (4, 16, 64) if not args.quick else (8, 32))
    if "hnsw" not in skip:
        bench_faiss("HNSW", "HNSW32", "efSearch", (16, 64, 256) if not args.quick else (16, 64), efConstruction=40)
    if "bucket" not in skip:
        t0 = time.perf_counter()
        n_b, b_y = nlist, 256
        idx = BucketIndex(table, n_buckets=n_b, bucket_size=b_y, n_probe=1)
        build = time.perf_counter() - t0
        for n_probe in (1, 4, 16):
            idx.n_probe = n_probe
            s, (_, ids) = timed_search(idx, q, k)
            record("Bucket (SCE)", f"n_b={n_b} b_y={b_y} n_probe={n_probe}", build, s, recall_at_k(ids, ref),
                   idx.memory_bytes(), "random directions, exact rescoring")

    summary = {
        "benchmark": "retrieval",
        "C": C, "d": d, "queries": nq, "k": k, "threads": args.threads, "nlist": nlist, "clusters": clusters,
        "noise": args.noise, "norm_sigma": args.norm_sigma,
        "faiss": faiss.__version__, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rows": rows,
    }
    if args.md:
        write_md(args.md, summary)
    if args.plot:
        write_plot(args.plot, summary)
    print(json.dumps(summary))
    return 0


def write_md(path: str, s: dict) -> None:
    lines = [
        f"C = {s['C']:,}, d = {s['d']}, {s['queries']} queries, top-{s['k']}, {s['threads']} threads "
        f"(faiss {s['faiss']}, torch {s['torch']}, CPU).",
        "",
        "| index | parameters | build s | queries/s | recall@%d | memory MiB |" % s["k"],
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in s["rows"]:
        lines.append(f"| {r['index']} | {r['params']} | {r['build_s']:.2f} | {r['qps']:,.0f} | "
                     f"{r['recall_at_k']:.3f} | {r['memory_mb']:,.1f} |")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as fh:
        fh.write("\n".join(lines) + "\n\n")


def write_plot(path: str, s: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    by = {}
    for r in s["rows"]:
        by.setdefault(r["index"], []).append(r)
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r["qps"])
        ax.plot([r["qps"] for r in rs], [r["recall_at_k"] for r in rs], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("queries / s (log)")
    ax.set_ylabel(f"recall@{s['k']} vs exact")
    ax.set_title(f"MIPS, C={s['C']:.0e}, d={s['d']}, {s['threads']} CPU threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
