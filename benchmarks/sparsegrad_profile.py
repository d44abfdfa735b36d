"""Where a SparseGrad training step spends its time, next to LoRA's: torch.profiler over a few steps.

    python benchmarks/sparsegrad_profile.py --device cuda --model minilm --steps 20
    python benchmarks/sparsegrad_profile.py --quick                       # CPU, 5 steps

Same set-up as ``benchmarks/sparsegrad_sst2.py`` (MiniLM-L6, SST-2, batch 32 x 64 tokens, bf16 weight-gradient
GEMMs). For each method it prints the ops with the most self time (device time on a GPU, CPU time otherwise)
and counts the host syncs per step (``cudaStreamSynchronize`` / ``cudaMemcpy`` / ``aten::item`` /
``aten::_local_scalar_dense`` calls). Ends by printing one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (cudaMemcpyAsync is counted apart: into pinned memory it does not block; into pageable memory it does)
ASYNC_COPY = "cudaMemcpyAsync"
LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel")  # the runtime's and the driver's (cuBLAS may use either)
SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "aten::item",
            "aten::_local_scalar_dense")


def launches_by_op(events, cuda: bool, steps: int, top: int = 20) -> list[dict]:
    """Where the launches come from: on a GPU, kernel launches per step grouped by (region, the outermost operator
    that issued them); on a CPU, the outermost operator calls themselves (each launches at least one kernel on a
    GPU; views, metadata calls and no-op casts, which launch nothing, are left out). The region is the autograd
    node or the optimizer step around it, else the forward."""
    import collections

    def is_op(e):
        return e.name.startswith(("aten::", "scalerec::"))

    def region_and_outer(e):
        """(the region around ``e``, the outermost operator event at or above ``e``, or None)"""
        region, outer, p = "forward", None, e
        while p is not None:
            if is_op(p):
                outer = p
            if region == "forward" and (p.name.startswith("autograd::engine::evaluate_function:")
                                        or p.name.startswith("Optimizer.step")):
                region = p.name.removeprefix("autograd::engine::evaluate_function: ")
            p = p.cpu_parent
        return region, outer

    # on a CPU: calls that launch nothing on a GPU (views, metadata, allocation) are left out
    quiet = {"aten::" + n for n in ("reshape", "view", "_unsafe_view", "_reshape_alias", "t", "transpose", "permute",
                                    "select", "slice", "as_strided", "unsqueeze", "squeeze", "expand", "alias",
                                    "detach", "_indices", "_values", "indices", "values", "empty", "empty_like",
                                    "new_empty", "empty_strided", "lift_fresh", "result_type", "to", "_to_copy",
                                    "contiguous", "split", "chunk", "unbind", "narrow", "flatten", "numpy_T")}
    c = collections.Counter()
    for e in events:
        if cuda and e.name.startswith(LAUNCH):
            region, outer = region_and_outer(e.cpu_parent) if e.cpu_parent is not None else ("?", None)
            c[(region, outer.name if outer is not None else "(no operator)")] += 1
        elif not cuda and is_op(e) and e.name not in quiet:
            region, outer = region_and_outer(e)
            if outer is e:  # no operator above it
                c[(region, e.name)] += 1
    return [{"region": r, "op": o, "per_step": n / steps} for (r, o), n in c.most_common(top)]


def profile_method(method: str, args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from scalerec.peft.data import classification_batches, read_sst2
    from scalerec.peft.train import FinetuneSettings, _load, _on, setup_method

    fused = not method.endswith("_unfused")
    s = FinetuneSettings(method=method.removesuffix("_unfused"), model=args.model, device=args.device,
                         batch_size=args.batch_size, max_length=args.max_length, calibration_steps=5,
                         grad_dtype=args.grad_dtype, sparse_state=args.sparse_state, threads=args.threads,
                         fused_optimizer=fused)
    torch.manual_seed(0)
    dev = torch.device(s.device)
    model, tok = _load(s)
    model.to(dev)
    xs, ys = read_sst2("train", None, None)
    batches = _on(classification_batches(tok, xs, ys, s.batch_size, 0, s.max_length), dev)
    calib = _on(classification_batches(tok, xs, ys, s.batch_size, 1000, s.max_length), dev)
    model, opt, _ = setup_method(s, model, calib)
    model.train()
    cuda = dev.type == "cuda"

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for b in itertools.islice(batches, 5):  # warm-up (cuBLAS handles, allocator, the compact state's growth)
        step(b)
    todo = list(itertools.islice(batches, args.steps))
    if cuda:
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for b in todo:  # timed without the profiler
        step(b)
    if cuda:
        torch.cuda.synchronize(dev)
    step_ms = 1e3 * (time.perf_counter() - t0) / len(todo)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for b in todo:
            step(b)
        if cuda:
            torch.cuda.synchronize(dev)
    ev = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    top = sorted(ev, key=lambda e: getattr(e, key, 0) or 0, reverse=True)[: args.top]
    rows = [{"op": e.key, "self_ms_per_step": (getattr(e, key, 0) or 0) / 1e3 / len(todo),
             "calls_per_step": e.count / len(todo)} for e in top]
    syncs = {e.key: e.count / len(todo) for e in ev
             if e.key != ASYNC_COPY and any(e.key.startswith(k) for k in SYNC_OPS)}
    async_copies = sum(e.count for e in ev if e.key == ASYNC_COPY) / len(todo)
    launches = sum(e.count for e in ev if e.key.startswith(LAUNCH)) / len(todo)
    # the optimizer step's host time (its whole CPU time, children included; profiled), and its own (self) part
    opt_ev = [e for e in ev if e.key.startswith("Optimizer.step#")]
    opt_ms = sum(e.cpu_time_total for e in opt_ev) / 1e3 / len(todo)
    opt_self_ms = sum(e.self_cpu_time_total for e in opt_ev) / 1e3 / len(todo)
    print(f"== {method}: {step_ms:.2f} ms/step (unprofiled), kernel launches/step {launches:.0f}, syncs/step {syncs}, "
          f"cudaMemcpyAsync/step {async_copies:.1f}, optimizer host ms/step {opt_ms:.2f} (self {opt_self_ms:.2f})",
          file=sys.stderr)
    for r in rows:
        print(f"   {r['self_ms_per_step']:8.3f} ms  x{r['calls_per_step']:6.1f}  {r['op'][:90]}", file=sys.stderr)
    by_op = launches_by_op(prof.events(), cuda, len(todo))
    what = "kernel launches" if cuda else "outermost operator calls (views, metadata and allocation left out)"
    print(f"   {what} per step by region and operator:", file=sys.stderr)
    for r in by_op:
        print(f"   {r['per_step']:8.1f} x  {r['region'][:40]:40s} {r['op'][:60]}", file=sys.stderr)
    return {"step_ms": step_ms, "kernel_launches_per_step": launches, "syncs_per_step": syncs,
            "async_copies_per_step": async_copies,
            "optimizer_host_ms": opt_ms, "optimizer_self_host_ms": opt_self_ms, "top": rows,
            ("launches_by_op" if cuda else "operator_calls_by_op"): by_op}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 steps (CPU by default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--methods", default="lora,sparsegrad",
                    help="comma-separated; a name ending in _unfused (e.g. sparsegrad_unfused) runs the method with "
                         "the optimizer's Python reference step instead of the one-call op")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--grad-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bfloat16 where a timed bf16 GEMM is >= 1.25x faster, else float32")
    ap.add_argument("--sparse-state", default="auto", choices=["auto", "compact", "dense"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.grad_dtype == "auto":
        from scalerec.peft.config import fast_grad_dtype

        args.grad_dtype = fast_grad_dtype(args.device)
    if args.steps is None:
        args.steps = 5 if args.quick else 20
    out = {"benchmark": "sparsegrad_profile", "device": args.device, "steps": args.steps,
           "sparse_state": args.sparse_state, "methods": {}}
    for m in args.methods.split(","):
        out["methods"][m] = profile_method(m, args)
    base = out["methods"].get("lora")
    if base:
        out["speed_vs_lora"] = {m: base["step_ms"] / r["step_ms"] for m, r in out["methods"].items()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
