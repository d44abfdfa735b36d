"""Fitting with the frozen model sharded over Ray workers (ZeRO-3, scalerec.llm.sharded): equality with the
unsharded fit on the real SmolLM2-135M GGUF; per-rank peak RSS, build time and step time of a >= 1.5B Llama config
at W = 1 vs 2 against the plan (scalerec.llm.llm_plan). (Job-level throughput and slot refill vs fixed batches are
not measured by this script yet.)

    python benchmarks/llm_sharded.py --quick                        # equality, float32, 4 texts x 10 steps
    python benchmarks/llm_sharded.py --sections equality --dtype float64 --steps 50
    python benchmarks/llm_sharded.py --sections memory --model-config smollm2-1.7b

Every section starts its own Ray actors (1 thread each) and prints what it measured; the run ends with ONE JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from scalerec.llm import FitConfig  # noqa: E402

TEXT = ROOT / "data" / "text" / "tinyshakespeare_head.txt"


def passages(lm_encode, n: int, lengths) -> list[list[int]]:
    ids = lm_encode(TEXT.read_text())
    lens = [lengths] * n if isinstance(lengths, int) else list(lengths)
    return [ids[1000 + 500 * i: 1000 + 500 * i + lens[i]] for i in range(n)]


def _ray(world: int):
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(2, world), include_dashboard=False, log_to_driver=False)


def equality(dtype: str, steps: int, n_texts: int = 4, tokens: int = 16) -> dict:
    """SmolLM2-135M (the bundled GGUF, via its converted safetensors) sharded over 2 ranks vs whole in this process."""
    from scalerec.llm.decoding import decode_one_step
    from scalerec.llm.model import load_causal_lm
    from scalerec.llm.sharded import reference_fit
    from scalerec.llm.sharded_job import fit_on_group, resolve_source, start_group, stop_group

    torch.set_num_threads(1)
    dt = getattr(torch, dtype)
    source = resolve_source("smollm2", dtype=dtype)
    lm = load_causal_lm("smollm2", dtype=dt, device="cpu")
    toks = passages(lm.encode, n_texts, tokens)
    cfg = FitConfig(max_steps=steps)
    _ray(2)
    t0 = time.perf_counter()
    actors = start_group(2, source)
    t_build = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        sh, sh_losses = fit_on_group(actors, toks, "one-step", 2, cfg, batch_size=2)
        t_fit = time.perf_counter() - t0
    finally:
        stop_group(actors)
    out = {"dtype": dtype, "texts": n_texts, "tokens": tokens, "steps": steps, "sharded_build_s": t_build,
           "sharded_fit_s": t_fit}
    # (a) the ranks' own batches (texts r, r + 2) unsharded, (b) all texts in one unsharded batch
    same = [None] * n_texts
    same_l = [None] * n_texts
    t0 = time.perf_counter()
    for r in range(2):
        res, ls = reference_fit(lm, toks[r::2], "one-step", 2, cfg)
        for j, i in enumerate(range(r, n_texts, 2)):
            same[i], same_l[i] = res[j], ls[j]
    out["unsharded_fit_s"] = time.perf_counter() - t0
    one, one_l = reference_fit(lm, toks, "one-step", 2, cfg)
    for name, ref, ref_l in (("same_batches", same, same_l), ("one_batch", one, one_l)):
        dl = max(abs(a - b) for i in range(n_texts) for a, b in zip(sh_losses[i], ref_l[i]))
        rel = max(abs(a - b) / abs(b) for i in range(n_texts) for a, b in zip(sh_losses[i], ref_l[i]))
        dv = max(float((sh[i].vectors - ref[i].vectors).abs().max()) for i in range(n_texts))
        out[name] = {"max_abs_dloss": dl, "max_rel_dloss": rel, "max_abs_dvector": dv,
                     "steps_equal": [s.steps for s in sh] == [r.steps for r in ref],
                     "accuracy_equal": [s.accuracy for s in sh] == [r.accuracy for r in ref],
                     "loss_lengths_equal": [len(a) for a in sh_losses] == [len(b) for b in ref_l]}
    lens = [len(t) for t in toks]
    got = [lm.decode_ids(x) for x in decode_one_step(lm, torch.stack([s.vectors for s in sh]), lens)]
    want = [lm.decode_ids(x) for x in decode_one_step(lm, torch.stack([r.vectors for r in one]), lens)]
    out["decoded_identical"] = got == want
    out["accuracies"] = [s.accuracy for s in sh]
    out["steps_per_text"] = [s.steps for s in sh]
    print(f"[equality {dtype}] {json.dumps(out)}", file=sys.stderr)
    return out


def _rss_fit(lm, toks, cfg, batch):
    """Run on each rank: fit, then this process's peak RSS."""
    import resource

    from scalerec.llm.sharded import fit_sharded

    t0 = time.perf_counter()
    res = fit_sharded(lm, toks, 2, "one-step", cfg, batch_size=batch)
    return {"fit_s": time.perf_counter() - t0, "steps": sum(r.steps for r in res),
            "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _baseline_rss(lm):
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory(model_config: str, worlds=(1, 2), batch: int = 2, tokens: int = 16, steps: int = 2) -> dict:
    """Per-rank peak RSS of building the sharded model (random weights, fp32) and fitting ``batch`` texts per rank
    for ``steps`` steps, at each W; the plan's prediction beside it."""
    from scalerec.llm.llm_plan import plan, texts_per_hour
    from scalerec.llm.model_config import load_model_config
    from scalerec.llm.sharded_job import ModelSource, run_on_group, start_group, stop_group

    config = load_model_config(model_config)
    out = {"model_config": model_config, "batch": batch, "tokens": tokens, "steps": steps, "worlds": {}}
    cfg = FitConfig(max_steps=steps, target_accuracy=2.0, restart_patience=None)
    g = torch.Generator().manual_seed(0)
    for W in worlds:
        _ray(W)
        toks = [torch.randint(3, config.vocab_size, (tokens,), generator=g).tolist() for _ in range(batch * W)]
        t0 = time.perf_counter()
        actors = start_group(W, None)
        base = run_on_group(actors, _baseline_rss, [()] * W)
        t1 = time.perf_counter()
        import ray

        built = ray.get([a.build.remote(ModelSource(config=config, weights="random", tokenizer=None,
                                                    name=model_config, seed=0)) for a in actors])
        t_build = time.perf_counter() - t1
        try:
            t1 = time.perf_counter()
            fits = run_on_group(actors, _rss_fit, [(toks[r::W], cfg, batch) for r in range(W)])
            t_fit = time.perf_counter() - t1
        finally:
            stop_group(actors)
        p = plan(config, W, batch, tokens, "float32", "cpu")
        step_s = t_fit / steps
        out["worlds"][W] = {"rss_before_build_gb": [b for b in base], "rss_after_build_gb": [b["max_rss_gb"]
                                                                                             for b in built],
                            "peak_rss_gb": [f["max_rss_gb"] for f in fits], "build_s": t_build,
                            "step_s": step_s, "texts_per_hour_at_steps": W * batch * 3600 / t_fit,
                            "plan_mem_gb": p["mem_gb"], "plan_step_s": p["step_s"],
                            "plan_texts_per_hour": texts_per_hour(p, steps), "group_start_s": t1 - t0}
        print(f"[memory W={W}] {json.dumps(out['worlds'][W])}", file=sys.stderr)
    if len(worlds) == 2:
        a, b = (max(out["worlds"][w]["peak_rss_gb"]) for w in worlds)
        out["ratio_w2_w1"] = b / a
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="equality only, float32, 10 steps")
    ap.add_argument("--sections", default="equality", help="comma list: equality, memory")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--model-config", default="smollm2-1.7b")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--worlds", default="1,2", help="memory: the W to measure, e.g. 1,2")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sections = ["equality"] if args.quick else [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - {"equality", "memory"})
    if unknown:
        ap.error(f"unknown sections {unknown}: equality, memory")
    result = {"sections": sections, "threads_per_rank": 1}
    if "equality" in sections:
        result["equality"] = equality(args.dtype, 10 if args.quick else args.steps)
    if "memory" in sections:
        result["memory"] = memory(args.model_config, worlds=tuple(int(w) for w in args.worlds.split(",")),
                                  batch=args.batch, tokens=args.tokens)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
