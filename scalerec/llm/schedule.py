"""Fit settings that depend on the text (the length rule) and the escalation ladder of an encoding job.

A user of ``scalerec encode`` hands over texts of mixed lengths and sets no fit flags. The settings that reach an
exact fit depend on the text's token count N (docs/llm.md, "Defaults and escalation"): the steps to an exact fit
grow faster than N, restarts that help at 8–16 tokens re-initialise longer fits before they converge, AR fits of
64 tokens need a warm growth curriculum, and long fits tend to stop one or a few tokens short, where a margin-loss
polish finishes them. So:

* :data:`LENGTH_RULE` gives, per mode and length bucket, the first attempt's step budget, restart patience,
  growth curriculum and polish (:func:`rule_settings`);
* :data:`LADDER` says how each further attempt changes them (a fresh seed, more steps, warm growth, a longer
  polish) (:func:`attempt_settings`);
* :func:`encode_texts` fits a batch of texts through the ladder: a text that greedy decoding does not reproduce
  exactly after an attempt is fitted again with the next rung, until it is exact, the ladder ends, or the next
  attempt's worst case would take the text past ``max_seconds_per_text``. Every attempt is recorded.

Settings the user gives (``fit``: FitConfig field -> value) hold for every attempt; the rule and the ladder set
only the others. Exact always means greedy decoding reproduces the token ids, never teacher-forced accuracy.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from .fit_config import FitConfig
from .model import LoadedLM

RULES = ("length", "fixed")   # "fixed": FitConfig's own defaults at every length (the behaviour before the rule)

# Per mode, rows of (largest N of the bucket, settings of the first attempt). A text of N tokens takes the first
# row whose bound is >= N; texts longer than the last bound take the last row. Values chosen from the measurements
# on the tuning passages (docs/llm.md, "Defaults and escalation"); ``None`` restart patience: no restarts (the
# ladder's next attempt is the restart, with a whole budget), ``None`` grow_from: no curriculum.
LENGTH_RULE: dict[str, list[tuple[int, dict]]] = {
    "one-step": [
        (16, dict(max_steps=400, restart_patience=100, grow_from=None, polish_steps=100, polish_max_wrong=1)),
        (32, dict(max_steps=600, restart_patience=400, grow_from=None, polish_steps=200, polish_max_wrong=2)),
        (48, dict(max_steps=900, restart_patience=None, grow_from=None, polish_steps=300, polish_max_wrong=2)),
        (64, dict(max_steps=1200, restart_patience=None, grow_from=None, polish_steps=400, polish_max_wrong=3)),
        (96, dict(max_steps=3000, restart_patience=None, grow_from=None, polish_steps=400, polish_max_wrong=3)),
        (128, dict(max_steps=3000, restart_patience=None, grow_from=None, polish_steps=400, polish_max_wrong=4)),
    ],
    "ar": [
        (16, dict(max_steps=400, restart_patience=100, grow_from=None, polish_steps=100, polish_max_wrong=1)),
        (32, dict(max_steps=1000, restart_patience=None, grow_from=None, polish_steps=200, polish_max_wrong=2)),
        (48, dict(max_steps=1500, restart_patience=None, grow_from=16, polish_steps=400, polish_max_wrong=3)),
        (64, dict(max_steps=2500, restart_patience=None, grow_from=16, polish_steps=400, polish_max_wrong=3)),
        (96, dict(max_steps=3000, restart_patience=None, grow_from=16, polish_steps=400, polish_max_wrong=4)),
        (128, dict(max_steps=3000, restart_patience=None, grow_from=16, polish_steps=400, polish_max_wrong=4)),
    ],
}


@dataclass(frozen=True)
class Rung:
    """How an attempt changes the rule's settings: a fresh seed (``seed_offset`` added to the run seed), the step
    budget times ``steps_factor``, a warm growth curriculum from ``N / grow_divisor`` tokens (at least 8; 0: the
    rule's own ``grow_from``) and the polish times ``polish_factor`` (steps and tokens it may fix)."""

    name: str
    seed_offset: int = 0
    steps_factor: float = 1.0
    grow_divisor: int = 0
    polish_factor: float = 1.0


LADDER: tuple[Rung, ...] = (
    Rung("base"),
    Rung("reseed-grow", seed_offset=1, steps_factor=1.5, grow_divisor=4),
    Rung("long", seed_offset=2, steps_factor=2.0, grow_divisor=4, polish_factor=2.0),
)

LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128)  # summary buckets: 1-16, 17-32, ..., 97-128, >128


def length_bucket(n_tokens: int | None) -> str:
    """The summary bucket of a text of ``n_tokens`` tokens ("1-16", "17-32", …, ">128"; "unknown" for None)."""
    if n_tokens is None:
        return "unknown"
    lo = 1
    for hi in LENGTH_BUCKETS:
        if n_tokens <= hi:
            return f"{lo}-{hi}"
        lo = hi + 1
    return f">{LENGTH_BUCKETS[-1]}"


def rule_settings(n_tokens: int, mode: str) -> dict:
    """The first attempt's settings for a text of ``n_tokens`` tokens in ``mode`` (a copy of the rule's row)."""
    if mode not in LENGTH_RULE:
        raise ValueError(f"unknown mode {mode!r}: 'one-step' or 'ar'")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    rows = LENGTH_RULE[mode]
    for bound, row in rows:
        if n_tokens <= bound:
            return dict(row)
    return dict(rows[-1][1])


def attempt_settings(n_tokens: int, mode: str, attempt: int, fit: dict | None = None, rule: str = "length") -> dict:
    """FitConfig keyword arguments of ``attempt`` (1-based) for a text of ``n_tokens`` tokens: the rule's row
    changed by the ladder's rung, then the user's ``fit`` settings on top (they hold for every attempt).
    ``rule="fixed"``: FitConfig's own defaults instead of the rule's row (the ladder still applies)."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}: one of {', '.join(RULES)}")
    if not 1 <= attempt <= len(LADDER):
        raise ValueError(f"attempt must be 1..{len(LADDER)}, got {attempt}")
    fit = dict(fit or {})
    if rule == "length":
        s = rule_settings(n_tokens, mode)
    else:
        d = FitConfig()
        s = dict(max_steps=d.max_steps, restart_patience=d.restart_patience, grow_from=d.grow_from,
                 polish_steps=d.polish_steps, polish_max_wrong=d.polish_max_wrong)
    rung = LADDER[attempt - 1]
    s["seed"] = int(fit.get("seed", 0)) + rung.seed_offset
    s["max_steps"] = int(round(s["max_steps"] * rung.steps_factor))
    if rung.grow_divisor and n_tokens > 8:
        s["grow_from"] = s["grow_from"] or max(8, n_tokens // rung.grow_divisor)
    if rung.polish_factor != 1.0 and s["polish_steps"]:
        s["polish_steps"] = int(round(s["polish_steps"] * rung.polish_factor))
        if s["polish_max_wrong"] is not None:
            s["polish_max_wrong"] = int(math.ceil(s["polish_max_wrong"] * rung.polish_factor))
    s.update({k: v for k, v in fit.items() if k != "seed"})
    return s


def worst_case_steps(n_tokens: int, cfg: FitConfig) -> float:
    """An attempt's most expensive course in one-token-of-this-text steps: every stage of the growth curriculum
    spends its whole budget (a stage of L tokens weighted L / N: a step's cost grows with the length), then the
    whole polish."""
    from .fitting import prefix_stages

    stages = prefix_stages(n_tokens, cfg.grow_from)
    return cfg.max_steps * sum(L / n_tokens for L in stages) + cfg.polish_steps


# ----------------------------------------------------------------------------------------------
# the escalation loop

@dataclass
class AttemptRecord:
    """One attempt of one text."""

    attempt: int
    rung: str
    steps: int
    seconds: float
    accuracy: float           # the fit's own token accuracy (teacher-forced in AR mode)
    decoded_accuracy: float   # fraction of positions greedy decoding gets right
    exact: bool               # greedy decoding reproduces every token
    restarts: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class EncodeResult:
    """A text's outcome over all its attempts: the best attempt's vectors (an exact one if any) and the record."""

    token_ids: list[int]
    vectors: torch.Tensor
    accuracy: float
    loss: float
    exact: bool
    decoded_accuracy: float
    stop_reason: str          # "exact", "cost_cap" (the next attempt could exceed the cap) or "ladder_end"
    attempts: list[AttemptRecord] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(a.steps for a in self.attempts)

    @property
    def seconds(self) -> float:
        return sum(a.seconds for a in self.attempts)

    @property
    def restarts(self) -> int:
        return sum(a.restarts for a in self.attempts)


def _key(kw: dict) -> str:
    return repr(sorted(kw.items()))


def encode_texts(lm: LoadedLM, token_lists: list[list[int]], mode: str = "one-step", n_mem: int = 1,
                 shared_m: torch.Tensor | None = None, fit: dict | None = None, rule: str = "length",
                 max_attempts: int | None = None, max_seconds_per_text: float | None = None,
                 batch_size: int = 8, log=None) -> list[EncodeResult]:
    """Fit every text through the escalation ladder (module docstring); returns one result per text, in order.

    Texts with the same settings are fitted together in batches of ``batch_size`` (the fitter keeps them
    independent). Before attempt k > 1 a text's worst case (:func:`worst_case_steps` times its own seconds per
    step so far) is added to the seconds it has spent; if that exceeds ``max_seconds_per_text`` the text stops with
    ``stop_reason="cost_cap"``. The first attempt always runs."""
    from .decoding import decode
    from .fitting import fit_ar, fit_one_step

    n_att = len(LADDER) if max_attempts is None else int(max_attempts)
    if not 1 <= n_att <= len(LADDER):
        raise ValueError(f"max_attempts must be 1..{len(LADDER)} (the ladder's rungs), got {max_attempts}")
    if max_seconds_per_text is not None and not max_seconds_per_text > 0:
        raise ValueError(f"max_seconds_per_text must be > 0 (or None: no cap), got {max_seconds_per_text}")
    if mode not in ("one-step", "ar"):
        raise ValueError(f"unknown mode {mode!r}: 'one-step' or 'ar'")
    B = len(token_lists)
    records: list[list[AttemptRecord]] = [[] for _ in range(B)]
    best: list[tuple | None] = [None] * B          # (rank key, FitResult, decoded accuracy, exact)
    stop: list[str | None] = [None] * B
    for k in range(1, n_att + 1):
        todo = [i for i in range(B) if stop[i] is None]
        if not todo:
            break
        groups: dict[str, tuple[FitConfig, list[int]]] = {}
        for i in todo:
            n = len(token_lists[i])
            cfg = FitConfig(**attempt_settings(n, mode, k, fit, rule))
            if k > 1 and max_seconds_per_text is not None:
                spent = sum(a.seconds for a in records[i])
                per_step = spent / max(1, sum(a.steps for a in records[i]))
                if spent + per_step * worst_case_steps(n, cfg) > max_seconds_per_text:
                    stop[i] = "cost_cap"
                    continue
            groups.setdefault(_key(cfg.to_dict()), (cfg, []))[1].append(i)
        for cfg, idx in groups.values():
            idx.sort(key=lambda i: len(token_lists[i]))
            for b in range(0, len(idx), max(1, batch_size)):
                chunk = idx[b: b + batch_size]
                toks = [token_lists[i] for i in chunk]
                if mode == "one-step":
                    res = fit_one_step(lm, toks, cfg, shared_m=shared_m)
                else:
                    res = fit_ar(lm, toks, n_mem=n_mem, config=cfg)
                dec = decode(lm, torch.stack([r.vectors for r in res]), [len(t) for t in toks], mode=mode,
                             shared_m=shared_m)
                for i, t, r, got in zip(chunk, toks, res, dec):
                    dacc = sum(int(a == b) for a, b in zip(got, t)) / len(t)
                    exact = list(got) == list(t)
                    records[i].append(AttemptRecord(attempt=k, rung=LADDER[k - 1].name, steps=r.steps,
                                                    seconds=r.seconds, accuracy=r.accuracy, decoded_accuracy=dacc,
                                                    exact=exact, restarts=r.restarts))
                    rank = (exact, dacc, r.accuracy, -r.loss)
                    if best[i] is None or rank > best[i][0]:
                        best[i] = (rank, r, dacc, exact)
                    if exact:
                        stop[i] = "exact"
                    if log is not None:
                        log(f"[encode] attempt {k} ({LADDER[k - 1].name}) N={len(t)}: decoded {dacc:.4f}, "
                            f"exact {exact}, {r.steps} steps, {r.seconds:.1f} s")
    out = []
    for i in range(B):
        _, r, dacc, exact = best[i]
        out.append(EncodeResult(token_ids=list(token_lists[i]), vectors=r.vectors, accuracy=r.accuracy, loss=r.loss,
                                exact=exact, decoded_accuracy=dacc, stop_reason=stop[i] or "ladder_end",
                                attempts=records[i]))
    return out
