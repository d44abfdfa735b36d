"""What a fit is asked and what it returns, and the pieces every fitter shares: the configuration, the result,
initialisation, restart seeds, the learning-rate schedule and the input checks."""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

import torch

from .inputs import n_sink
from .model import LoadedLM

STEP_MODES = ("auto", "eager", "static", "graph")


@dataclass
class FitConfig:
    """Optimiser and budget of a fit. Defaults were chosen by measurement on SmolLM2-135M (docs/llm.md)."""

    lr: float = 0.05
    betas: tuple[float, float] = (0.9, 0.9)
    weight_decay: float = 0.01
    eps: float = 1e-8
    max_steps: int = 400
    warmup_steps: int = 10
    schedule: str = "cosine"          # "cosine" (to min_lr_ratio * lr at max_steps) or "constant"
    min_lr_ratio: float = 0.1
    clip_norm: float | None = 1.0     # per-text gradient norm clip (None: off)
    init: str = "mean"               # "mean": mean token embedding + noise; "normal": N(0, emb std)
    init_noise: float = 1.0          # noise scale in units of the embedding table's per-coordinate std
    seed: int = 0
    target_accuracy: float = 1.0
    ce_floor: float = 0.0            # per-token loss max(CE - ce_floor, 0): tokens already predicted with
                                     # confidence stop pulling, the gradient goes to the ones still wrong
    margin_tau: float = 0.0          # > 0: instead of CE, the soft max-min margin loss tau * logsumexp(-margin / tau)
                                     # over the tokens (margin: target logit - best other logit): polishes a fit
                                     # that is a token or two short, resumed at a small lr (docs/llm.md); 0: CE
    polish_steps: int = 0            # > 0: after the fit (each stage with grow_from), up to this many steps of the
                                     # margin loss (polish_tau, polish_lr, no warm-up, no restarts) from the best
                                     # vectors of every text left short of target_accuracy; the better result counts
    polish_lr: float = 1e-4
    polish_tau: float = 0.25
    polish_max_wrong: int | None = None  # polish only texts with at most this many wrong tokens after the fit
                                     # (a few tokens short); None: every text short of target_accuracy
    restart_patience: int | str | None = "auto"  # re-initialise a text whose best accuracy has not improved for
                                     # this many steps; "auto": restart_patience_for(n_tokens); None or 0: never
    grow_from: int | None = None     # curriculum: fit the text's first grow_from tokens, then 2x, 4x, ... and
                                     # finally all of it, each stage warm-started from the last one's vectors
                                     # (max_steps is then a per-stage budget); None or 0: fit the whole text at once
    step_mode: str = "auto"          # "eager": each step runs the active texts only (shapes shrink, a host sync a
                                     # step); "static": every text every step at fixed shapes, finished ones masked,
                                     # the host looks in every sync_every steps; "graph": "static" captured once
                                     # in a CUDA graph and replayed (CUDA only); "auto": "graph" on CUDA (without
                                     # record_history), else "eager". All follow one update rule (docs/llm.md).
    sync_every: int = 25             # static/graph: steps between the host's looks (restarts, progress, on_step)

    def __post_init__(self):
        if self.step_mode not in STEP_MODES:
            raise ValueError(f"step_mode must be one of {', '.join(STEP_MODES)}, got {self.step_mode!r}")
        if not (isinstance(self.sync_every, int) and not isinstance(self.sync_every, bool) and self.sync_every >= 1):
            raise ValueError(f"sync_every must be an int >= 1, got {self.sync_every!r}")
        p = self.restart_patience
        if not (p is None or p == "auto" or (isinstance(p, int) and not isinstance(p, bool) and p >= 0)):
            raise ValueError(f"restart_patience must be 'auto', an int >= 0 or None (off), got {p!r}")
        if not (isinstance(self.margin_tau, (int, float)) and not isinstance(self.margin_tau, bool)
                and math.isfinite(self.margin_tau) and self.margin_tau >= 0):
            raise ValueError(f"margin_tau must be a finite number >= 0 (0: the CE loss), got {self.margin_tau!r}")
        if isinstance(self.polish_steps, bool) or not isinstance(self.polish_steps, int) or self.polish_steps < 0:
            raise ValueError(f"polish_steps must be an int >= 0 (0: off), got {self.polish_steps!r}")
        for name in ("polish_lr", "polish_tau"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        w = self.polish_max_wrong
        if not (w is None or (isinstance(w, int) and not isinstance(w, bool) and w >= 1)):
            raise ValueError(f"polish_max_wrong must be an int >= 1 or None (every short text), got {w!r}")
        g = self.grow_from
        if not (g is None or (isinstance(g, int) and not isinstance(g, bool) and g >= 0)):
            raise ValueError(f"grow_from must be an int >= 1 (first stage's tokens), or None / 0 (off), got {g!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def restart_patience_for(cfg: FitConfig, n_tokens: int) -> int | None:
    """Steps without a better accuracy after which a text of ``n_tokens`` tokens is re-initialised (None: never).

    ``"auto"``: 100 up to 16 tokens, then ``100 * (n_tokens / 16) ** 2`` — the steps to an exact fit grow about
    that fast with the length (SmolLM2, one-step: ~80 at 16 tokens, ~260 at 32, 650–2,000 at 64; docs/llm.md),
    and a fixed 100 re-initialised every 64-token fit before it converged (0/2, against 2/2 without restarts).
    """
    p = cfg.restart_patience
    if p is None or p == 0:
        return None
    if p == "auto":
        return int(100 * max(1.0, n_tokens / 16) ** 2)
    return int(p)


@dataclass
class FitResult:
    """One text's fit."""

    vectors: torch.Tensor      # [n_vectors, d] float32, on CPU (one-step: [e, m] or [e] with shared m; ar: mems)
    token_ids: list[int]
    accuracy: float
    steps: int
    seconds: float
    loss: float
    restarts: int = 0
    history: list[float] = field(default_factory=list)  # per-step accuracy (only when record_history)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


# ----------------------------------------------------------------------------------------------
# initialisation and schedule

def _init_vectors(lm: LoadedLM, n: int, cfg: FitConfig, gen: torch.Generator) -> torch.Tensor:
    W = lm.embedding.weight.detach().float()
    std = W.std().item()
    d = W.shape[1]
    noise = torch.randn(n, d, generator=gen) * std * cfg.init_noise
    if cfg.init == "mean":
        return W.mean(0).cpu().view(1, d) + noise
    if cfg.init == "normal":
        return noise
    raise ValueError(f"unknown init {cfg.init!r}: 'mean' or 'normal'")


def _text_seed(seed: int, toks: list[int], restart: int = 0) -> int:
    """A text's initialisation seed: a function of the run seed and the text only (not of its batch)."""
    h = hashlib.sha256(f"{seed}|{restart}|{','.join(map(str, toks))}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def initial_vectors(lm: LoadedLM, token_lists: list[list[int]], n_vectors: int, cfg: FitConfig,
                    init: torch.Tensor | None) -> torch.Tensor:
    """The fit's starting vectors [B, n_vectors, d], float32 on the model's device: ``init`` when given, else a
    draw per text seeded by the run seed and the text only (not by its batch)."""
    if init is not None:
        return init.detach().float().to(lm.device).clone().view(len(token_lists), n_vectors, lm.hidden_size)
    return torch.stack([_init_vectors(lm, n_vectors, cfg, torch.Generator().manual_seed(_text_seed(cfg.seed, t)))
                        for t in token_lists]).to(lm.device)


def restart_vectors(lm: LoadedLM, cfg: FitConfig, toks: list[int], restart: int, n_vectors: int,
                    init_row: torch.Tensor | None) -> torch.Tensor:
    """A text's vectors after its ``restart``-th re-initialisation ([n_vectors, d] float32 on the CPU): a fresh
    draw seeded by the run seed, the text and the restart number, or, for a fit started from given vectors
    (``init_row``), those vectors plus noise of 0.1 embedding std."""
    gen = torch.Generator().manual_seed(_text_seed(cfg.seed, toks, restart))
    if init_row is None:
        return _init_vectors(lm, n_vectors, cfg, gen)
    d = lm.hidden_size
    return init_row.detach().float().cpu() + 0.1 * torch.randn(n_vectors, d, generator=gen) * \
        lm.embedding.weight.std().item()


def _lr_at(cfg: FitConfig, step: torch.Tensor) -> torch.Tensor:
    """Per-text learning rate for per-text step counts (0-based)."""
    s = step.float()
    warm = torch.clamp((s + 1) / max(cfg.warmup_steps, 1), max=1.0)
    if cfg.schedule == "constant":
        return cfg.lr * warm
    if cfg.schedule != "cosine":
        raise ValueError(f"unknown schedule {cfg.schedule!r}: 'cosine' or 'constant'")
    frac = torch.clamp((s - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1), 0.0, 1.0)
    cos = 0.5 * (1 + torch.cos(math.pi * frac))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def padded_targets(token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths [B], targets [B, max length] right-padded with -100)."""
    lengths = torch.tensor([len(t) for t in token_lists])
    targets = torch.full((len(token_lists), int(lengths.max())), -100, dtype=torch.long)
    for i, toks in enumerate(token_lists):
        targets[i, : len(toks)] = torch.tensor(toks)
    return lengths, targets


def _check_tokens(lm: LoadedLM, token_lists: list[list[int]], extra: int) -> None:
    """Every text non-empty and within the context with ``extra`` fitted positions (and the sink) in front."""
    extra += n_sink(lm)
    for i, toks in enumerate(token_lists):
        if len(toks) == 0:
            raise ValueError(f"text {i}: empty (no tokens to fit)")
        if len(toks) + extra > lm.max_positions:
            raise ValueError(f"text {i}: {len(toks)} tokens (+{extra}) exceed the model context of "
                             f"{lm.max_positions} positions")
