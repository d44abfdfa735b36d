"""How many tokens SmolLM2-135M reproduces from 2 one-step vectors, 1 shared-m vector, or 1 AR [mem] vector;
fitting throughput at batch sizes 1/8/32; Ray scaling of the encoding job (2 workers vs 1).

    python benchmarks/llm_capacity.py --quick                       # <= ~2 min: 8/16-token ladder, 2 passages
    python benchmarks/llm_capacity.py --sections capacity --lengths 16,32,64 --passages 5 --max-steps 1500
    python benchmarks/llm_capacity.py --sections throughput,ray

Capacity per text: the largest N of the ladder whose N-token passage (a prefix of the same source passage)
is reproduced at 100% token accuracy within the step budget. Reported: best text and mean over texts, with
steps and seconds per text at each N. Ends with ONE JSON line of figures (also written to --json-out).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

TEXT = ROOT / "data" / "text" / "tinyshakespeare_head.txt"
PAPER = {  # Pythia-160M, the papers' smallest model, token accuracy 0.99
    "one_step_per_text_m_best": 128, "one_step_shared_m_best": 45, "ar_1mem_mean": 80,
    "one_step_seconds_a100": {"32": 6, "128": 68},
}


_IDS: dict = {}  # TEXT -> its token ids: the passages, corpus and sections of one run share one tokenisation


def _text_ids(lm) -> list[int]:
    if TEXT not in _IDS:
        _IDS[TEXT] = lm.encode(TEXT.read_text())
    return _IDS[TEXT]


def passage_start(i: int) -> int:
    """Passage i starts at token 1000 + 500 i of the bundled text."""
    return 1000 + 500 * i


def passages(lm, numbers, max_len: int) -> list[list[int]]:
    """The passages with these numbers, ``max_len`` tokens each (see :func:`passage_start`)."""
    text = _text_ids(lm)
    out = [text[passage_start(i): passage_start(i) + max_len] for i in numbers]
    short = [i for i, p in zip(numbers, out) if len(p) != max_len]
    if short:
        raise SystemExit(f"{TEXT}: {len(text)} tokens, too short for {max_len}-token passages {short} (passage i starts "
                         f"at token {passage_start(0)} + {passage_start(1) - passage_start(0)} i)")
    return out


def corpus(lm, n_passages: int, n_texts: int, n_tokens: int) -> list[list[int]]:
    """``n_texts`` consecutive ``n_tokens``-token texts after the test passages' region (no overlap with them)."""
    ids = _text_ids(lm)
    start = passage_start(n_passages)
    out = [ids[start + n_tokens * i: start + n_tokens * (i + 1)] for i in range(n_texts)]
    if len(out[-1]) != n_tokens:
        raise SystemExit(f"--shared-corpus: the bundled text holds fewer than {n_texts} x {n_tokens} tokens")
    return out


def load_shared_m(path: str, numbers: list[int], max_len: int) -> torch.Tensor:
    """A --shared-m-out file: {"m": [d], "corpus_tokens": [start, end)}. Passages that overlap the corpus the m
    was fitted on would be measured on text the m has seen: an error naming them."""
    data = torch.load(path)
    if not (isinstance(data, dict) and torch.is_tensor(data.get("m")) and len(data.get("corpus_tokens", ())) == 2):
        raise SystemExit(f"--shared-m-in {path}: not a --shared-m-out file ({{'m', 'corpus_tokens'}} expected)")
    lo, hi = data["corpus_tokens"]
    seen = [p for p in numbers if passage_start(p) < hi and lo < passage_start(p) + max_len]
    if seen:
        raise SystemExit(f"--shared-m-in {path}: passages {seen} overlap the text this m was fitted on "
                         f"(tokens {lo}-{hi - 1} of {TEXT.name}); test other passages")
    return data["m"]


def capacity(lm, mode: str, lengths: list[int], texts: list[list[int]], cfg, shared_m=None, log=print,
             on_length=None, warm: bool = False, vectors_out: dict | None = None, start: dict | None = None,
             resume: dict | None = None, labels: list | None = None, log_every: int = 0, save_every: int = 0,
             on_save=None) -> dict:
    """The ladder. ``warm``: each rung starts from the vectors of the rung below (the curriculum of
    ``FitConfig.grow_from`` with the ladder's lengths as its stages); its "steps"/"seconds" are then the rung's
    own and "steps_total"/"seconds_total" include the rungs below. ``vectors_out``: filled with {N: {passage index:
    fitted vectors}}. "decoded_exact" counts the texts regenerated exactly from their vectors alone.
    ``start``: {text index: (N, vectors)} — an earlier run's exact vectors for the text's first N tokens (N below
    the ladder's first rung): they are checked by decoding, count as the text's capacity so far, and warm-start
    its first rung (steps/seconds of that earlier run are not in the totals). ``resume``: {text index: vectors} —
    the first rung starts from these instead (an earlier run's not-yet-exact vectors of that rung: a fit resumed
    with a fresh schedule; needs ``start`` for the capacity below it). ``labels``: the texts' names in error
    messages (passage numbers; default: their index). ``log_every``: a line every that many fitting steps (each
    text's best token accuracy so far, seconds a step); 0: none. ``save_every``: every that many steps, the rung's
    best vectors so far go into ``vectors_out`` and ``on_save()`` is called (a stopped run keeps them); 0: only at
    the end of each rung."""
    from scalerec.llm import decode, fit_ar, fit_one_step

    dmode = "ar" if mode == "ar" else "one-step"
    per_len = {}
    alive = list(range(len(texts)))  # texts still exact at every length so far
    best = {i: 0 for i in range(len(texts))}
    prev: dict = {}  # the rung below's vectors by text (kept only when warm)
    if start:
        if sorted(start) != alive:
            raise ValueError("start: vectors are needed for every text or none")
        dec = decode(lm, torch.stack([start[i][1] for i in alive]), [start[i][0] for i in alive], mode=dmode,
                     shared_m=shared_m)
        bad = [i for i in alive if dec[i] != texts[i][:start[i][0]]]
        if bad:
            names = [labels[i] if labels else i for i in bad]
            raise ValueError(f"start: the vectors of passages {names} do not decode to their first N tokens")
        prev = {i: start[i][1] for i in alive}
        best = {i: start[i][0] for i in alive}
    if resume:
        if not start or sorted(resume) != alive:
            raise ValueError("resume: needs start, and vectors for every text")
        prev = dict(resume)
    spent = {i: (0, 0.0) for i in range(len(texts))}
    clock = {"t": 0.0, "last": 0, "logged": 0, "saved": 0}

    def on_step(step, best_accuracy, active, seconds, best_vectors=None):
        # The eager fitter calls this every step, the static/graph one every sync_every steps, so a line is logged
        # (a save made) at the first call at least log_every (save_every) steps after the last one. A fit (rung)
        # counts its steps from the start again.
        if step <= clock["last"]:
            clock.update(t=0.0, logged=0, saved=0)
        clock["t"] += seconds
        clock["last"] = step
        if log_every and step - clock["logged"] >= log_every:
            log(f"[{mode}] N={n} step {step}: best accuracy {[round(float(a), 4) for a in best_accuracy]}, "
                f"{int(active.sum())} texts active, {clock['t'] / (step - clock['logged']):.3f} s a step")
            clock.update(t=0.0, logged=step)
        if save_every and step - clock["saved"] >= save_every and vectors_out is not None and best_vectors is not None:
            vectors_out[n] = {i: best_vectors[j].detach().float().cpu().clone() for j, i in enumerate(alive)}
            clock["saved"] = step
            if on_save is not None:
                on_save()

    for n in lengths:
        if not alive:
            break
        toks = [texts[i][:n] for i in alive]
        init = torch.stack([prev[i] for i in alive]) if prev else None
        t0 = time.perf_counter()
        if mode == "ar":
            res = fit_ar(lm, toks, n_mem=1, config=cfg, init=init, on_step=on_step)
        else:
            res = fit_one_step(lm, toks, cfg, shared_m=shared_m, init=init, on_step=on_step)
        wall = time.perf_counter() - t0
        # the claim checked the way a user reads it back: decode (one forward pass / greedy generation) from the
        # fitted vectors alone and compare with the text
        rung = {i: r.vectors for i, r in zip(alive, res)}
        dec = decode(lm, torch.stack(list(rung.values())), [len(t) for t in toks], mode=dmode, shared_m=shared_m)
        if vectors_out is not None:
            vectors_out[n] = rung
        per_len[n] = {"texts": len(toks), "exact": sum(r.accuracy == 1.0 for r in res),
                      "decoded_exact": sum(d_ == t for d_, t in zip(dec, toks)),
                      "accuracy": [round(r.accuracy, 4) for r in res], "steps": [r.steps for r in res],
                      "seconds": [round(r.seconds, 1) for r in res], "restarts": [r.restarts for r in res],
                      "wall_seconds": round(wall, 1)}
        if warm:
            prev = rung
            for i, r in zip(alive, res):
                spent[i] = (spent[i][0] + r.steps, spent[i][1] + r.seconds)
            per_len[n]["warm_start"] = init is not None
            per_len[n]["steps_total"] = [spent[i][0] for i in alive]
            per_len[n]["seconds_total"] = [round(spent[i][1], 1) for i in alive]
        log(f"[{mode}] N={n}: {per_len[n]}")
        if on_length is not None:
            on_length(per_len)
        nxt = []
        for i, r in zip(alive, res):
            if r.accuracy == 1.0:
                best[i] = n
                nxt.append(i)
        alive = nxt
    caps = list(best.values())
    return {"per_length": per_len, "capacity_per_text": caps, "capacity_best": max(caps),
            "capacity_mean": sum(caps) / len(caps), "budget_steps": cfg.max_steps,
            "untested_above": max(lengths), "warm_ladder": warm}


@torch.no_grad()
def text_entropy(lm, texts: list[list[int]], lengths: list[int]) -> dict:
    """The model's own cross-entropy of each text's first N tokens with nothing before them but the sink token
    (BOS): {N: [bits per text]}. The cramming paper finds this, not N, sets how many tokens one vector holds."""
    if lm.sink_id is None:
        raise ValueError("text_entropy: the model was loaded without a sink token (BOS), so a text's first token "
                         "has nothing to be predicted from")
    out: dict = {n: [] for n in lengths}
    for toks in texts:
        ids = torch.tensor([[lm.sink_id] + list(toks[:max(lengths)])], device=lm.device)
        logits = lm.model(input_ids=ids).logits[0, :-1].float()
        nats = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").cumsum(0)
        for n in lengths:
            out[n].append(round(float(nats[n - 1]) / math.log(2), 1))
    return out


def saved_vectors(files: list[str], mode: str) -> dict:
    """{N: {passage: vectors}} of ``mode`` from --vectors-out files, merged over the files."""
    saved: dict = {}
    for f in files:
        data = torch.load(f)
        if not isinstance(data, dict):
            raise SystemExit(f"{f}: not a --vectors-out file (a dict by mode expected)")
        for n, per in data.get(mode, {}).items():
            saved.setdefault(int(n), {}).update(per)
    return saved


def starting_vectors(files: list[str], mode: str, numbers: list[int], first_length: int) -> dict:
    """{text index: (N, vectors)} from --vectors-out files: per passage, its vectors of the largest N below
    ``first_length``. A passage with none is an error (naming it and the files)."""
    saved = saved_vectors(files, mode)
    out = {}
    for i, p in enumerate(numbers):
        ns = [n for n, per in saved.items() if p in per and n < first_length]
        if not ns:
            raise SystemExit(f"--vectors-in: no {mode} vectors of passage {p} below N={first_length} in {files}")
        out[i] = (max(ns), saved[max(ns)][p])
    return out


def resume_vectors(path: str, mode: str, numbers: list[int], length: int) -> dict:
    """{text index: vectors} of rung ``length`` from a --vectors-out file, for every passage (or an error)."""
    per = saved_vectors([path], mode).get(length, {})
    missing = [p for p in numbers if p not in per]
    if missing:
        raise SystemExit(f"--resume {path}: no {mode} vectors at N={length} for passages {missing}")
    return {i: per[p] for i, p in enumerate(numbers)}


def throughput(lm, cfg, batch_sizes=(1, 8, 32), n_tokens: int = 16, steps: int = 3, log=print) -> dict:
    """Seconds per fitting step at each batch size (fixed work: the target is unreachable), and the texts/hour
    that follows from the measured mean steps per text at this length."""
    from scalerec.llm import FitConfig, fit_one_step

    src = passages(lm, range(max(batch_sizes)), n_tokens)
    out = {}
    for b in batch_sizes:
        c = FitConfig(**{**cfg.to_dict(), "max_steps": steps, "target_accuracy": 2.0})
        t0 = time.perf_counter()
        fit_one_step(lm, src[:b], c)
        dt = (time.perf_counter() - t0) / steps
        out[b] = {"seconds_per_step": round(dt, 3), "text_steps_per_second": round(b / dt, 2)}
        log(f"[throughput] B={b}: {out[b]}")
    return out


def ray_scaling(model: str, n_texts: int, n_tokens: int, steps: int, log=print) -> dict:
    """The encoding job with 1 worker vs 2 workers (1 thread each), fixed work per text."""
    from scalerec.llm.jobs import JobSpec, run_job

    ids = None
    from scalerec.llm import load_causal_lm

    lm = load_causal_lm(model)
    ids = passages(lm, range(n_texts), n_tokens)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "in.jsonl"
        inp.write_text("".join(json.dumps({"id": i, "text": lm.decode_ids(p)}) + "\n" for i, p in enumerate(ids)))
        del lm
        for w in (1, 2):
            spec = JobSpec(model=model, input=str(inp), output=str(Path(tmp) / f"out{w}"), shard_size=max(1, n_texts // 4),
                           batch_size=8, workers=w, threads=1, fit={"max_steps": steps, "target_accuracy": 2.0},
                           max_attempts=1)  # a fixed budget per text: no escalation, as the timing assumes
            s = run_job(spec, progress=False)
            out[w] = {"seconds": round(s["seconds"], 1), "texts_per_hour": round(s["texts_per_hour"], 1)}
            log(f"[ray] workers={w}: {out[w]}")
    out["speedup_2_over_1"] = round(out[1]["seconds"] / out[2]["seconds"], 2)
    return out


def plot_steps(files: list[str], out: str) -> dict:
    """Steps to an exact fit against N from capacity JSON files (this script's --json-out), one point per text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts: dict = {}
    for f in files:
        d = json.loads(Path(f).read_text().strip().splitlines()[-1])
        where = "GPU" if str(d.get("device", "cpu")).startswith("cuda") else "CPU"
        for key, val in d.items():
            if not key.startswith(("capacity_", "partial_")) or not isinstance(val, dict):
                continue
            mode = key.split("_", 1)[1]
            for n, row in val.get("per_length", val).items():
                # a warm ladder's rung: its steps to exact include the rungs below (steps_total)
                m = mode + (", warm ladder" if "steps_total" in row else "")
                for steps, acc in zip(row.get("steps_total", row["steps"]), row["accuracy"]):
                    pts.setdefault((m, where, acc == 1.0), []).append((int(n), steps))
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    colors = {"one-step": "tab:blue", "ar": "tab:orange", "shared-m": "tab:green",
              "one-step, warm ladder": "tab:purple", "ar, warm ladder": "tab:red",
              "shared-m, warm ladder": "tab:olive"}
    for (mode, where, exact), xy in sorted(pts.items()):
        xs, ys = zip(*xy)
        ax.scatter(xs, ys, c=colors.get(mode, "gray"), marker=("o" if where == "CPU" else "s") if exact else "x",
                   alpha=0.75, label=f"{mode}, {where}" + ("" if exact else ", not exact (budget)"))
    ns = [16, 32, 64, 128]
    ax.plot(ns, [100 * max(1, n / 16) ** 2 for n in ns], "k--", lw=1, label='restart_patience "auto"')
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("steps to 100 % token accuracy")
    ax.set_title("SmolLM2-135M: steps per text to an exact fit")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no point hidden
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return {f"{m}|{w}|{'exact' if e else 'missed'}": len(v) for (m, w, e), v in pts.items()}


def main(argv: list[str] | None = None) -> int:
    global TEXT  # --text replaces the bundled passage source
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sections", default=None,
                    help="comma-separated, of capacity, entropy, throughput, ray (default: capacity,throughput,ray; "
                         "quick: capacity,entropy,throughput)")
    ap.add_argument("--modes", default="one-step,shared-m,ar")
    ap.add_argument("--lengths", default="16,32,64,128")
    ap.add_argument("--text", default=None, metavar="TXT",
                    help=f"the text the passages are cut from (default: the bundled {TEXT.name}; e.g. the full "
                         "tinyshakespeare.txt, whose first 60,000 characters are the bundled file)")
    ap.add_argument("--passages", type=int, default=5)
    ap.add_argument("--first-passage", type=int, default=0, help="index of the first passage (split a run in parts)")
    ap.add_argument("--passage-ids", default=None,
                    help="comma-separated passage numbers to fit (instead of --passages/--first-passage)")
    ap.add_argument("--max-steps", type=int, default=1500)
    ap.add_argument("--shared-corpus", type=int, default=16, help="texts the shared m is fitted on (other passages)")
    ap.add_argument("--shared-steps", type=int, default=400)
    ap.add_argument("--shared-tokens", type=int, default=16, help="tokens per corpus text of the shared-m fit")
    ap.add_argument("--shared-batch", type=int, default=16, help="corpus texts per step of the shared-m fit")
    ap.add_argument("--shared-m-out", default=None,
                    help="save the fitted shared m here (torch.save: {'m': [d] float32, 'corpus_tokens': [start, end) "
                         "of the bundled text it was fitted on})")
    ap.add_argument("--shared-m-in", default=None,
                    help="use this --shared-m-out file's m instead of fitting one (passages that overlap its corpus "
                         "are refused)")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--dtype", default="float32", help="model dtype: float32 (default), bfloat16, float16")
    ap.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 matrix products (float32 model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ray-texts", type=int, default=None, help="texts of the Ray scaling job (default 8; quick 4)")
    ap.add_argument("--ray-steps", type=int, default=None, help="fixed steps per text in the Ray job (default 40)")
    ap.add_argument("--log-every", type=int, default=100,
                    help="a progress line every N fitting steps (best accuracy per text, s a step); 0: none")
    ap.add_argument("--save-every", type=int, default=0, metavar="N",
                    help="with --vectors-out: also save each rung's best vectors so far every N fitting steps, so a "
                         "run stopped mid-rung keeps its progress (resume it with --resume); 0: at rung ends only")
    ap.add_argument("--polish-steps", type=int, default=0, metavar="K",
                    help="after each rung, up to K steps of the margin loss from the best vectors of every text "
                         "the rung left short (FitConfig.polish_steps; the same as --fit polish_steps=K); 0: off")
    ap.add_argument("--polish-lr", type=float, default=1e-4, help="lr of the polishing fit (default 1e-4)")
    ap.add_argument("--polish-tau", type=float, default=0.25, help="its margin_tau (default 0.25)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--plot", nargs="+", default=None, metavar="JSON",
                    help="only plot steps-to-exact vs N from these --json-out files (to --plot-out) and exit")
    ap.add_argument("--plot-out", default="llm_capacity_steps.png")
    ap.add_argument("--warm-ladder", action="store_true",
                    help="start each rung of the capacity ladder from the rung below's vectors (a curriculum)")
    ap.add_argument("--vectors-out", default=None,
                    help="save the fitted vectors here (torch.save: {mode: {N: {passage: tensor}}})")
    ap.add_argument("--vectors-in", nargs="+", default=None, metavar="PT",
                    help="--vectors-out files of earlier runs: each passage starts from its vectors of the largest "
                         "saved N below the first length (checked by decoding; implies --warm-ladder)")
    ap.add_argument("--resume", default=None, metavar="PT",
                    help="a --vectors-out file of a run that stopped in the first rung: that rung starts from its "
                         "vectors (needs --vectors-in for the capacity below)")
    ap.add_argument("--fit", action="append", default=[], metavar="KEY=VALUE",
                    help="a FitConfig setting for the capacity fits, e.g. --fit restart_patience=400 (repeatable)")
    args = ap.parse_args(argv)
    if args.plot:
        print(json.dumps({"plot": args.plot_out, "points": plot_steps(args.plot, args.plot_out)}))
        return 0
    torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from scalerec.llm import FitConfig, fit_shared_m, load_causal_lm
    from scalerec.llm.jobs import fit_kwargs
    from scalerec.overrides import parse_key_values

    fit_overrides = fit_kwargs(parse_key_values(args.fit, "--fit"))  # bad settings fail before the model loads
    try:
        pids = [int(x) for x in args.passage_ids.split(",")] if args.passage_ids else None
    except ValueError:
        ap.error(f"--passage-ids: comma-separated ints expected, got {args.passage_ids!r}")
    if pids is not None and (not pids or min(pids) < 0 or len(set(pids)) != len(pids)):
        ap.error(f"--passage-ids: distinct passage numbers >= 0 expected, got {args.passage_ids!r}")

    if args.text:
        TEXT = Path(args.text)
        if not TEXT.is_file():
            ap.error(f"--text {args.text}: no such file")
    if args.save_every < 0:
        ap.error(f"--save-every must be >= 0, got {args.save_every}")
    if args.save_every and not args.vectors_out:
        ap.error("--save-every needs --vectors-out (the file the vectors are saved to)")
    if args.polish_steps < 0 or (args.polish_steps and not (args.polish_tau > 0 and args.polish_lr > 0)):
        ap.error("--polish-steps must be >= 0, and with it --polish-tau and --polish-lr > 0")
    if args.resume and not args.vectors_in:
        ap.error("--resume needs --vectors-in (the exact vectors of the rung below, the capacity so far)")
    if args.vectors_in:
        args.warm_ladder = True
    sections = (args.sections or ("capacity,entropy,throughput" if args.quick else "capacity,throughput,ray")).split(",")
    unknown = sorted(set(sections) - {"capacity", "entropy", "throughput", "ray"})
    if unknown:
        ap.error(f"--sections: unknown {unknown}; choose from capacity, entropy, throughput, ray")
    modes = args.modes.split(",")
    if args.quick:  # proves the script end to end; the figures come from the full runs
        args.lengths, args.passages, args.max_steps = "4,8", 1, 150
        args.shared_corpus, args.shared_steps = 4, 60
        modes = ["one-step", "ar"]
    lengths = [int(x) for x in args.lengths.split(",")]
    figures: dict = {"model": args.model, "text": str(TEXT.relative_to(ROOT) if TEXT.is_relative_to(ROOT) else TEXT),
                     "threads": args.threads, "quick": args.quick, "paper_pythia160m": PAPER,
                     "load_average_start": os.getloadavg()}
    t_all = time.perf_counter()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    lm = load_causal_lm(args.model, dtype=args.dtype, device=args.device)
    figures.update(device=str(lm.device), dtype=args.dtype, tf32=args.tf32)
    if lm.device.type == "cuda":
        figures["gpu"] = torch.cuda.get_device_name(lm.device)

    def save_partial():  # an interrupted run keeps what it measured
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({**figures, "partial": True}) + "\n")

    def rung_done(mode: str, per_length: dict) -> None:
        figures[f"partial_{mode}"] = per_length
        save_partial()

    polish = {"polish_steps": args.polish_steps, "polish_lr": args.polish_lr, "polish_tau": args.polish_tau}
    cfg = FitConfig(**{"max_steps": args.max_steps, **(polish if args.polish_steps else {}), **fit_overrides})
    saved: dict = {}
    numbers = pids or list(range(args.first_passage, args.first_passage + args.passages))
    if "capacity" in sections:
        texts = passages(lm, numbers, max(lengths))
        figures["passages"] = numbers
        for mode in modes:
            shared = None
            if mode == "shared-m":
                if args.shared_m_in:  # an m fitted by an earlier run (its figures are in that run's JSON)
                    shared = load_shared_m(args.shared_m_in, numbers, max(lengths))
                    figures["shared_m_fit"] = {"from": args.shared_m_in}
                else:
                    n_before = max(5, max(numbers) + 1)
                    corpus_src = corpus(lm, n_before, args.shared_corpus, args.shared_tokens)
                    sh = fit_shared_m(lm, corpus_src, steps=args.shared_steps, batch_size=args.shared_batch)
                    shared = sh.m
                    figures["shared_m_fit"] = {"corpus": len(corpus_src), "tokens": args.shared_tokens,
                                               "batch": args.shared_batch,
                                               "mean_accuracy": round(sh.mean_accuracy, 4), "steps": sh.steps,
                                               "seconds": round(sh.seconds, 1)}
                    if args.shared_m_out:
                        lo = passage_start(n_before)
                        torch.save({"m": shared, "corpus_tokens": [lo, lo + args.shared_corpus * args.shared_tokens]},
                                   args.shared_m_out)
                log(f"[shared-m] {figures['shared_m_fit']}")
                save_partial()
            vecs: dict = {}
            start = starting_vectors(args.vectors_in, mode, numbers, lengths[0]) if args.vectors_in else None
            if start:  # the capacity so far of each passage, from the earlier run's exact vectors
                figures[f"started_from_{mode}"] = {numbers[i]: n for i, (n, _) in start.items()}
                figures["vectors_in"] = args.vectors_in
            resume = resume_vectors(args.resume, mode, numbers, lengths[0]) if args.resume else None
            if resume:
                figures["resume"] = args.resume

            def save_vectors(mode=mode, vecs=vecs, shared=shared):  # after every rung: a stopped run keeps them
                if args.vectors_out:
                    saved[mode] = {n: {numbers[i]: v for i, v in per.items()} for n, per in vecs.items()}
                    if shared is not None:
                        saved["shared_m"] = shared
                    torch.save(saved, args.vectors_out)

            def on_length(per, mode=mode, save_vectors=save_vectors):
                rung_done(mode, per)
                save_vectors()

            figures[f"capacity_{mode}"] = capacity(
                lm, "ar" if mode == "ar" else "one-step", lengths, texts, cfg, shared_m=shared, log=log,
                on_length=on_length, warm=args.warm_ladder, vectors_out=vecs, start=start, resume=resume,
                labels=numbers, log_every=args.log_every, save_every=args.save_every, on_save=save_vectors)
            figures.pop(f"partial_{mode}", None)
            save_partial()  # (the vectors were saved after the last rung)
    if "entropy" in sections:  # cheap: one forward pass per passage
        ent = text_entropy(lm, passages(lm, numbers, max(lengths)), lengths)
        figures["entropy_bits"] = {"passages": numbers, "per_length": ent}
        log(f"[entropy] bits per passage {numbers}: {ent}")
    if "throughput" in sections:
        tp = throughput(lm, cfg, batch_sizes=(1, 4) if args.quick else (1, 8, 32), steps=2 if args.quick else 3, log=log)
        mean_steps = None
        cap = figures.get("capacity_one-step", {}).get("per_length", {}).get(16)
        if cap:
            mean_steps = sum(cap["steps"]) / len(cap["steps"])
        figures["throughput_16_tokens"] = tp
        if mean_steps:
            figures["texts_per_hour_16_tokens"] = {b: round(3600 * v["text_steps_per_second"] / mean_steps, 1)
                                                   for b, v in tp.items()}
            figures["mean_steps_16_tokens"] = mean_steps
    if "ray" in sections:
        del lm
        figures["ray"] = ray_scaling(args.model, args.ray_texts or (4 if args.quick else 8), 8,
                                     args.ray_steps or (5 if args.quick else 40), log=log)
    figures["seconds"] = round(time.perf_counter() - t_all, 1)
    figures["load_average_end"] = os.getloadavg()
    figures["fit_config"] = cfg.to_dict()
    line = json.dumps(figures)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
