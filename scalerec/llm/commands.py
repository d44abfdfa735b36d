"""``scalerec encode`` and ``scalerec decode``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("encode", help="fit embeddings for texts (JSONL/Parquet) with a frozen LLM, over Ray",
                              description="Fit one-step [e, m] (or [e] with a shared m) or autoregressive [mem] "
                                          "vectors per text; resumable: finished shards are skipped on rerun.")
    p.add_argument("--model", required=True, help="HF directory, hub id, .gguf file, or 'smollm2' (bundled)")
    p.add_argument("--input", required=True, help="texts: .jsonl (one {'id', 'text'} per line) or .parquet")
    p.add_argument("--output", required=True, help="output folder (Parquet shards + job.json)")
    p.add_argument("--mode", choices=["one-step", "ar"], default="one-step")
    p.add_argument("--n-mem", type=int, default=1, help="ar mode: [mem] vectors per text")
    p.add_argument("--workers", type=int, default=1, help="Ray actors, each with its own model copy")
    p.add_argument("--threads", type=int, default=1, help="torch threads (and Ray CPUs) per worker")
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8, help="texts fitted together inside a worker")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--fit", action="append", default=[], metavar="KEY=VALUE",
                   help="other FitConfig settings (JSON values), e.g. --fit clip_norm=0.5; they hold for every attempt")
    _add_defaults_args(p)
    p.add_argument("--shared-m", default=None, help="a shared m (.npy, from `scalerec encode --fit-shared-m`)")
    p.add_argument("--fit-shared-m", type=int, default=None, metavar="N_TEXTS",
                   help="first fit a shared m on the first N texts of the input, save it to OUTPUT/shared_m.npy "
                        "and fit only e per text")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--device", default=None)
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    p.add_argument("--max-shards", type=int, default=None, help="stop after this many shards (partial run)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    # the frozen model sharded over the workers (issue 36: scalerec/llm/sharded_job.py, docs/llm-sharded.md)
    p.add_argument("--shard-model", choices=["zero3"], default=None,
                   help="partition the frozen model over the --workers ranks (DeepSpeed ZeRO-3), not a copy each")
    p.add_argument("--model-config", default=None, help="with --shard-model: a Llama/Qwen config (preset, config.json "
                   "or folder), random weights seeded by --seed; tokenizer from its folder, else from --model")
    p.set_defaults(func=run_encode)

    d = subparsers.add_parser("decode", help="regenerate the texts of an encoding job and report exact-match rates")
    d.add_argument("--model", default=None, help="default: the job's model")
    d.add_argument("--input", required=True, help="an encoding job's output folder")
    d.add_argument("--dtype", default=None)
    d.add_argument("--device", default=None)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--show", type=int, default=0, help="print this many decoded texts")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=run_decode)


def _add_defaults_args(p) -> None:
    """The length rule, the escalation ladder and the estimate (docs/llm.md, "Defaults and escalation")."""
    p.add_argument("--max-seconds-per-text", type=float, default=None,
                   help="cost cap: a text gets no further attempt once that attempt's worst case could take it past "
                        "this many seconds (default: no cap; the first attempt always runs)")
    p.add_argument("--max-attempts", type=int, default=None,
                   help="rungs of the escalation ladder to try (default: all 3; 1: no escalation)")
    p.add_argument("--rule", choices=["length", "fixed"], default="length",
                   help="length: settings by the text's token count (default); fixed: FitConfig's defaults for all")
    p.add_argument("--estimate", action="store_true",
                   help="fit nothing: print the expected exact rate and seconds per text for this file, from the "
                        "model's calibration")
    p.add_argument("--calibration", default=None, help="--estimate: a calibration file (default: the bundled one)")


def _parse_fit(args) -> dict:
    from scalerec.overrides import parse_key_values

    fit = parse_key_values(args.fit, "--fit")
    for k in ("max_steps", "lr", "seed"):
        v = getattr(args, k)
        if v is not None:
            fit[k] = v
    return fit


def run_encode(args) -> int:
    from .jobs import SHARED_M, JobSpec, run_job

    if args.estimate:
        return run_estimate(args)

    shared = args.shared_m
    if args.fit_shared_m:
        if args.mode != "one-step":
            raise ValueError("--fit-shared-m applies to one-step mode")
        shared = _ensure_shared_m(args, Path(args.output) / SHARED_M)
    spec = JobSpec(model=args.model, input=args.input, output=args.output, mode=args.mode, n_mem=args.n_mem,
                   shard_size=args.shard_size, batch_size=args.batch_size, workers=args.workers,
                   threads=args.threads, dtype=args.dtype, device=args.device, fit=_parse_fit(args),
                   shared_m=shared, text_field=args.text_field, id_field=args.id_field, rule=args.rule,
                   max_attempts=args.max_attempts, max_seconds_per_text=args.max_seconds_per_text)
    if args.shard_model or args.model_config:  # issue 36: docs/llm-sharded.md
        from .sharded_job import print_summary, run_sharded_job

        if not args.shard_model:
            raise ValueError("--model-config needs --shard-model zero3")
        return print_summary(run_sharded_job(spec, model_config=args.model_config, ray_address=args.address,
                                             seed=args.seed or 0), args.json)
    summary = run_job(spec, ray_address=args.address, progress=not args.no_progress, max_shards=args.max_shards)
    msg = (f"shards: {summary['written']} written, {summary['skipped']} already done (of {summary['shards']}); "
           f"texts {summary['texts']} ({summary['fitted']} fitted, {summary['exact']} exact, {summary['failed']} failed)")
    print(msg + _by_length_lines(summary["by_length"]), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(summary))
    return 0


def _by_length_lines(by_length: dict) -> str:
    return "".join(f"\n  {b:>8} tokens: {c['exact']} exact, {c['not_exact']} not exact, {c['failed']} failed"
                   for b, c in by_length.items())


def run_estimate(args) -> int:
    """``scalerec encode --estimate``: tokenise the input, look its lengths up in the model's calibration."""
    from .estimate import estimate, load_calibration
    from .inputs import n_sink
    from .jobs import read_records

    recs = read_records(args.input, args.text_field, args.id_field)
    lm = _load(args.model, args.dtype, args.device)
    cal = load_calibration(lm.name, args.calibration)
    extra = (args.n_mem if args.mode == "ar" else 0) + n_sink(lm)
    lengths = []
    for r in recs:
        n = len(lm.encode(r.text)) if r.error is None else 0
        lengths.append(n if 0 < n and n + extra <= lm.max_positions else None)
    est = estimate(cal, args.mode, lengths)
    line = (f"{est['texts']} texts ({est['failed']} would fail, {est['uncalibrated']} beyond the calibrated "
            f"lengths {est['calibrated_lengths']}): expected exact rate {est['expected_exact_rate']}, "
            f"{est['expected_seconds_per_text']} s per text, {est['expected_seconds']} s in all (one worker, the "
            f"calibration's machine; held-out texts behind each calibrated length: {est['calibration_texts']})")
    for b, c in est["by_length"].items():
        line += (f"\n  {b:>8} tokens: {c['texts']} texts, expected exact rate {c['expected_exact_rate']}, "
                 f"{c['expected_seconds_per_text']} s per text")
    print(line, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(est))
    return 0


def _ensure_shared_m(args, dst: Path) -> str:
    """Fit a shared m on the first N texts (once; a rerun reuses the saved one)."""
    if dst.exists():
        return str(dst)
    import numpy as np
    import torch

    from .jobs import read_records
    from .shared import fit_shared_m

    torch.set_num_threads(max(1, args.threads))
    recs = [r for r in read_records(args.input, args.text_field, args.id_field) if r.error is None]
    recs = recs[: args.fit_shared_m]
    if not recs:
        raise ValueError(f"{args.input}: no valid texts to fit a shared m on")
    lm = _load(args.model, args.dtype, args.device)
    toks = [lm.encode(r.text) for r in recs]
    res = fit_shared_m(lm, toks, seed=args.seed or 0)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp.npy")
    np.save(tmp, res.m.numpy())
    os.replace(tmp, dst)
    print(f"shared m fitted on {len(toks)} texts: mean accuracy {res.mean_accuracy:.3f}", file=sys.stderr)
    return str(dst)


_LOADED: dict = {}


def _load(spec: str, dtype, device):
    """Load a model once per process (tests and notebooks call the commands repeatedly)."""
    from .model import load_causal_lm

    key = (spec, dtype, device)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_causal_lm(spec, dtype=dtype, device=device)
    return _LOADED[key]


def run_decode(args) -> int:
    import numpy as np
    import torch

    from .decoding import decode
    from .jobs import MANIFEST, SHARED_M, read_outputs

    folder = Path(args.input)
    man_path = folder / MANIFEST
    if not man_path.exists():
        raise FileNotFoundError(f"{folder}: not an encoding job output (no {MANIFEST})")
    man = json.loads(man_path.read_text())
    ident = man["identity"]
    rows = read_outputs(folder)
    ok = [r for r in rows if r["status"] == "ok"]
    lm = _load(args.model or ident["model"], args.dtype or ident.get("dtype"), args.device)
    shared = None
    if ident.get("shared_m"):
        shared = torch.as_tensor(np.load(folder / SHARED_M), dtype=torch.float32)
    exact_tok = exact_text = 0
    exact_ids: set = set()
    tok_correct = tok_total = 0
    shown = 0
    # group by length so one forward pass decodes a whole batch without padding waste
    ok.sort(key=lambda r: r["n_tokens"])
    for b in range(0, len(ok), args.batch_size):
        chunk = ok[b: b + args.batch_size]
        vecs = torch.stack([torch.tensor(r["vectors"], dtype=torch.float32) for r in chunk])
        lens = [r["n_tokens"] for r in chunk]
        ids = decode(lm, vecs, lens, mode=ident["mode"], shared_m=shared)
        for r, got in zip(chunk, ids):
            want = r["token_ids"]
            same = sum(int(a == b) for a, b in zip(got, want))
            tok_correct += same
            tok_total += len(want)
            exact_tok += int(got == want)
            if got == want:
                exact_ids.add((r["shard"], r["source"]))
            text = lm.decode_ids(got)
            exact_text += int(text == r["text"])
            if shown < args.show:
                print(f"[{r['id']}] {text!r}")
                shown += 1
    n = len(ok)
    from .jobs import outcome_by_length

    by_length = outcome_by_length(rows, exact=lambda r: (r["shard"], r["source"]) in exact_ids)
    summary = {"by_length": by_length, "texts": len(rows), "decoded": n, "failed": len(rows) - n,
               "exact_match_tokens": exact_tok / n if n else 0.0, "exact_match_text": exact_text / n if n else 0.0,
               "token_accuracy": tok_correct / tok_total if tok_total else 0.0, "mode": ident["mode"],
               "shards": len(set(r["shard"] for r in rows)), "n_shards": man["n_shards"]}
    line = (f"{n} texts decoded ({len(rows) - n} failed at encode): exact match {summary['exact_match_tokens']:.3f} "
            f"(tokens), {summary['exact_match_text']:.3f} (text); token accuracy {summary['token_accuracy']:.4f}"
            + _by_length_lines(by_length))
    print(line, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(summary))
    return 0
