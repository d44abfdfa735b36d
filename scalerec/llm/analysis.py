"""Geometry of one-step solutions on our model (the observations of Mezentsev & Oseledets, 2025).

1. Fitting the same text from different seeds lands on different solutions ``[e, m]`` (distances reported).
2. The straight line between two solutions of the same text loses accuracy in its middle; a quadratic
   (Bézier) curve ``p(t) = (1-t)² a + 2t(1-t) c + t² b`` at most ``max_ratio`` (1.2) times the straight
   line's length keeps it high: we fit the control point ``c`` and show both accuracy profiles.
3. Solutions of related texts (a passage and a one-word edit of it) vs unrelated texts, all started from the
   same initial vectors: how far apart they land.

``python -m scalerec.llm.analysis [--quick] [--out benchmarks]`` saves ``llm_analysis_paths.png`` and
``llm_analysis_distances.png`` and prints one JSON line of figures.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .fit_config import FitConfig, _init_vectors, _text_seed
from .fitting import fit_one_step
from .inputs import one_step_logits
from .model import LoadedLM


def _flat(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1).float()


def distances(a: torch.Tensor, b: torch.Tensor) -> dict:
    """L2 distance and cosine similarity of two solutions (whole [e, m] and per vector)."""
    out = {"l2": float((_flat(a) - _flat(b)).norm()), "cos": float(F.cosine_similarity(_flat(a), _flat(b), dim=0))}
    for i, name in enumerate(("e", "m")[: a.shape[0]]):
        out[f"l2_{name}"] = float((a[i] - b[i]).norm())
        out[f"cos_{name}"] = float(F.cosine_similarity(a[i].float(), b[i].float(), dim=0))
    return out


@torch.no_grad()
def path_accuracy(lm: LoadedLM, toks: list[int], points: torch.Tensor, batch: int = 16) -> list[float]:
    """Token accuracy of one-step decoding at each of ``points`` ([P, 2, d])."""
    tgt = torch.tensor(toks)
    L = len(toks)
    accs: list[float] = []
    for s in range(0, len(points), batch):
        p = points[s: s + batch].to(lm.device, lm.dtype)
        ids = one_step_logits(lm, p[:, 0:1], p[:, 1:2], L).argmax(-1).cpu()
        accs.extend((ids == tgt).float().mean(1).tolist())
    return accs


def bezier(a: torch.Tensor, c: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * a.dim()))
    return (1 - t) ** 2 * a + 2 * t * (1 - t) * c + t ** 2 * b


def curve_length(a, c, b, n: int = 64) -> torch.Tensor:
    pts = bezier(a, c, b, torch.linspace(0, 1, n + 1))
    return (pts[1:] - pts[:-1]).flatten(1).norm(dim=1).sum()


def fit_quadratic_path(lm: LoadedLM, toks: list[int], a: torch.Tensor, b: torch.Tensor, max_ratio: float = 1.2,
                       steps: int = 150, n_t: int = 4, lr: float = 0.02, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Fit the control point ``c`` of a quadratic curve from ``a`` to ``b`` that keeps the text decodable.

    Loss: mean CE at ``n_t`` jittered points of ``t`` in (0, 1), plus a penalty when the curve is longer than
    ``max_ratio`` times the straight line; the result is then pulled toward the midpoint until the length
    constraint holds exactly. Returns (c, length / straight length).
    """
    gen = torch.Generator().manual_seed(seed)
    a, b = a.float(), b.float()
    straight = float((b - a).norm())
    c = torch.nn.Parameter(((a + b) / 2).clone())
    opt = torch.optim.Adam([c], lr=lr)
    tgt = torch.tensor(toks, device=lm.device).repeat(n_t)
    L = len(toks)
    for _ in range(steps):
        t = (torch.arange(n_t) + torch.rand(n_t, generator=gen)) / n_t
        p = bezier(a, c, b, t).to(lm.device, lm.dtype)
        logits = one_step_logits(lm, p[:, 0:1], p[:, 1:2], L).float().reshape(-1, lm.model.config.vocab_size)
        ratio = curve_length(a, c, b) / straight
        loss = F.cross_entropy(logits, tgt) + 10.0 * torch.relu(ratio - max_ratio) ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mid = (a + b) / 2
        cc = c.detach().clone()
        for _ in range(60):  # enforce the length bound
            if float(curve_length(a, cc, b) / straight) <= max_ratio:
                break
            cc = mid + 0.9 * (cc - mid)
        return cc, float(curve_length(a, cc, b) / straight)


def one_word_edit(lm: LoadedLM, toks: list[int]) -> list[int]:
    """The passage with one word (a middle token that starts with a space) replaced by another word."""
    for j in range(len(toks) // 2, len(toks)):
        piece = lm.decode_ids([toks[j]])
        if piece.startswith(" ") and piece.strip().isalpha():
            for repl in (" king", " love", " night", " sword"):
                r = lm.encode(repl)
                if len(r) == 1 and r[0] != toks[j]:
                    return toks[:j] + r + toks[j + 1:]
    out = list(toks)
    out[len(toks) // 2] = lm.encode(" king")[0]
    return out


def run(lm: LoadedLM, passages: list[list[int]], seeds: int = 3, cfg: FitConfig | None = None, n_line: int = 11,
        path_steps: int = 150, out_dir: str | Path | None = None) -> dict:
    """The three observations on ``passages[0]`` (unrelated texts: the other passages)."""
    cfg = cfg or FitConfig()
    base = passages[0]
    L = len(base)
    t0 = time.perf_counter()
    # 1. same text, different seeds
    sols = [fit_one_step(lm, [base], FitConfig(**{**cfg.to_dict(), "seed": s}))[0] for s in range(seeds)]
    ok = [r for r in sols if r.accuracy == 1.0]
    seed_d = [distances(x.vectors, y.vectors) for x, y in itertools.combinations(ok, 2)]
    norms = [float(r.vectors.norm()) for r in ok]
    figures: dict = {"tokens": L, "seeds": seeds, "seed_fits_exact": len(ok),
                     "seed_steps": [r.steps for r in sols], "solution_norm_mean": sum(norms) / max(len(norms), 1),
                     "seed_l2": [d["l2"] for d in seed_d], "seed_cos": [d["cos"] for d in seed_d]}
    # 2. straight line vs quadratic curve between the first two exact solutions
    ts = torch.linspace(0, 1, n_line)
    if len(ok) >= 2:
        a, b = ok[0].vectors, ok[1].vectors
        line = path_accuracy(lm, base, torch.stack([(1 - t) * a + t * b for t in ts]))
        c, ratio = fit_quadratic_path(lm, base, a, b, steps=path_steps)
        curve = path_accuracy(lm, base, bezier(a, c, b, ts))
        figures.update(line_accuracy=line, curve_accuracy=curve, curve_length_ratio=ratio,
                       line_min_accuracy=min(line), curve_min_accuracy=min(curve))
    # 3. related (one-word edit) vs unrelated texts, all from the same initial vectors as the base fit (seed 0)
    init = _init_vectors(lm, 2, cfg, torch.Generator().manual_seed(_text_seed(cfg.seed, base))).unsqueeze(0)
    edited = one_word_edit(lm, base)
    others = [p[:L] for p in passages[1:]]
    group = [base, edited, *others]
    fits = fit_one_step(lm, group, cfg, init=init.expand(len(group), 2, lm.hidden_size).clone())
    ref = fits[0].vectors
    figures.update(
        edit_text=lm.decode_ids(edited), related_exact=fits[1].accuracy == 1.0,
        related_l2=distances(ref, fits[1].vectors)["l2"], related_cos=distances(ref, fits[1].vectors)["cos"],
        unrelated_l2=[distances(ref, f.vectors)["l2"] for f in fits[2:]],
        unrelated_cos=[distances(ref, f.vectors)["cos"] for f in fits[2:]],
        unrelated_exact=sum(f.accuracy == 1.0 for f in fits[2:]),
        seconds=time.perf_counter() - t0,
    )
    if out_dir is not None:
        plot(figures, Path(out_dir))
    return figures


def plot(fig: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if "line_accuracy" in fig:
        ts = [i / (len(fig["line_accuracy"]) - 1) for i in range(len(fig["line_accuracy"]))]
        f, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(ts, fig["line_accuracy"], "o-", label="straight line")
        ax.plot(ts, fig["curve_accuracy"], "s-", label=f"quadratic curve ({fig['curve_length_ratio']:.2f}× length)")
        ax.set_xlabel("t (solution A → solution B)")
        ax.set_ylabel("token accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"Two one-step solutions of one {fig['tokens']}-token text")
        ax.legend(loc="lower left", fontsize=8)
        f.tight_layout()
        p = out / "llm_analysis_paths.png"
        f.savefig(p, dpi=120)
        plt.close(f)
        paths.append(p)
    f, ax = plt.subplots(figsize=(5, 3.2))
    groups = [("same text,\nother seed", fig["seed_l2"]), ("one-word edit,\nsame init", [fig["related_l2"]]),
              ("unrelated text,\nsame init", fig["unrelated_l2"])]
    for i, (name, vals) in enumerate(groups):
        ax.scatter([i] * len(vals), vals, s=40)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
    ax.set_ylabel("L2 distance between solutions [e, m]")
    ax.set_title("Where one-step solutions land")
    f.tight_layout()
    p = out / "llm_analysis_distances.png"
    f.savefig(p, dpi=120)
    plt.close(f)
    paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scalerec.llm.analysis", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "data/text/tinyshakespeare_head.txt"))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--unrelated", type=int, default=3)
    ap.add_argument("--path-steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--quick", action="store_true", help="8-token passage, 2 seeds, 1 unrelated text, short path fit")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .model import load_causal_lm

    if args.quick:
        args.tokens, args.seeds, args.unrelated, args.path_steps = 8, 2, 1, 40
    lm = load_causal_lm(args.model)
    ids = lm.encode(Path(args.text).read_text())
    passages = [ids[1000 + 500 * i: 1000 + 500 * i + args.tokens] for i in range(1 + args.unrelated)]
    fig = run(lm, passages, seeds=args.seeds, path_steps=args.path_steps, out_dir=args.out)
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
