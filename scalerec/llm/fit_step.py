"""The arithmetic of one fitting step, shared by the eager fitter (``fitting.py``) and the fixed-shape one
(``static_fit.py``), so that both follow one update rule: the logits of the texts' inputs, the per-text losses and
token accuracy, and the per-text AdamW update."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fit_config import FitConfig, _lr_at
from .inputs import n_sink, one_step_logits, with_sink
from .model import LoadedLM


def fit_logits(lm: LoadedLM, xin: torch.Tensor, mode: str, L: int, shared_m: torch.Tensor | None = None,
               tok_prev: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 logits [B, L, vocab] whose position i predicts token i, for the fitted vectors ``xin``
    [B, n_vectors, d] (model dtype). One-step: ``xin`` is [e, m], or [e] with ``shared_m`` [B, 1, d]. AR: the mem
    vectors, then ``tok_prev`` [B, L - 1, d], the embeddings of all tokens but the last (padding positions embed
    token 0: after the real ones, never seen); position n_mem - 1 predicts token 0."""
    if mode == "one-step":
        m = xin[:, 1:2, :] if shared_m is None else shared_m
        return one_step_logits(lm, xin[:, 0:1, :], m, L).float()
    inputs = with_sink(lm, torch.cat([xin, tok_prev], dim=1))
    off = n_sink(lm) + xin.shape[1] - 1
    return lm.model(inputs_embeds=inputs, use_cache=False).logits[:, off: off + L, :].float()


def token_margins(logits: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """[B, L]: each position's target logit minus the largest other logit (> 0 where argmax decoding is right;
    +inf at padding, ``tgt == -100``)."""
    pad = tgt == -100
    t = tgt.masked_fill(pad, 0)
    own = logits.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    top2, at = logits.topk(2, dim=-1)  # the best other logit without a copy of the [B, L, vocab] logits
    other = torch.where(at[..., 0] == t, top2[..., 1], top2[..., 0])
    return (own - other).masked_fill(pad, float("inf"))


def text_losses(logits: torch.Tensor, tgt: torch.Tensor, cfg: FitConfig):
    """Per text: (the loss to differentiate; the loss that ranks its states and is reported; its token accuracy).
    ``tgt`` [B, L] is right-padded with -100. The loss is the mean of ``max(CE - ce_floor, 0)`` over the text's
    tokens, ranked by the plain mean CE; or with ``cfg.margin_tau > 0`` the soft minimum of its token margins,
    negated: ``tau * logsumexp(-margin / tau)`` (:func:`token_margins`), whose gradient goes to the few smallest
    margins (the wrong tokens and the right ones closest to flipping), ranked by itself: a polished state has
    larger margins, not necessarily a lower CE."""
    B, L = tgt.shape
    mask = tgt != -100
    n_tok = mask.sum(1)
    if cfg.margin_tau > 0:  # no CE at all: the margin loss ranks the states itself
        loss_per = cfg.margin_tau * torch.logsumexp(-token_margins(logits, tgt) / cfg.margin_tau, dim=1)
        plain = loss_per.detach().clone()
    else:
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none",
                             ignore_index=-100).view(B, L)
        lossc_tok = ce if cfg.ce_floor <= 0 else torch.clamp(ce - cfg.ce_floor, min=0.0)
        loss_per = (lossc_tok * mask).sum(1) / n_tok
        with torch.no_grad():
            plain = (ce * mask).sum(1) / n_tok
    with torch.no_grad():
        acc = ((logits.argmax(-1) == tgt) & mask).sum(1).float() / n_tok.float()
    return loss_per, plain, acc


@torch.no_grad()
def adamw_rows(P: torch.Tensor, exp_avg: torch.Tensor, exp_sq: torch.Tensor, g: torch.Tensor, steps: torch.Tensor,
               cfg: FitConfig):
    """One AdamW step of each text's vectors ([R, n_vectors, d] rows, float32), with a per-text gradient-norm clip
    and per-text learning rate and bias corrections. ``steps`` [R]: each row's step count including this step.
    Returns (new vectors, new first moments, new second moments)."""
    b1, b2 = cfg.betas
    gg = g.float()
    if cfg.clip_norm is not None:
        norms = gg.flatten(1).norm(dim=1).clamp(min=1e-12)
        gg = gg * torch.clamp(cfg.clip_norm / norms, max=1.0).view(-1, 1, 1)
    st = steps.clamp(min=1).float().view(-1, 1, 1)
    lr = _lr_at(cfg, steps - 1).view(-1, 1, 1)
    ea = exp_avg * b1 + gg * (1 - b1)
    es = exp_sq * b2 + gg * gg * (1 - b2)
    denom = (es / (1 - b2 ** st)).sqrt() + cfg.eps
    return P * (1 - lr * cfg.weight_decay) - lr * ((ea / (1 - b1 ** st)) / denom), ea, es
