"""gBCE (gSASRec, Petrov & Macdonald 2023): k negatives and a calibrated positive probability."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from scalerec.losses.registry import register_loss, sample_uniform_negatives
from scalerec.ops import gather_dot


def gbce_beta(num_negatives: int, num_items: int, t: float) -> float:
    """β = α(t(1 − 1/α) + 1/α) with sampling rate α = k / (C − 1)."""
    alpha = num_negatives / (num_items - 1)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


@register_loss("gbce")
def gbce_loss(hidden, table, targets, num_negatives=256, t=0.75):
    """BCE over the positive and k uniform negatives, where σ(s_pos) is replaced by σ(s_pos)^β.

    The positive's logit becomes s' = -log(σ(s)^-β - 1) so that σ(s') = σ(s)^β, computed stably in log space.
    A sampled negative equal to the query's positive is dropped (β assumes negatives drawn from the C − 1 other
    items); the loss is the mean over the remaining terms.
    """
    if num_negatives <= 0:
        raise ValueError(f"gbce: num_negatives must be positive, got {num_negatives}")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"gbce: t must lie in [0, 1], got {t}")
    C = table.size(0) - 1
    beta = gbce_beta(num_negatives, C, t)
    neg_ids = sample_uniform_negatives((hidden.size(0), num_negatives), C, hidden.device)
    logits = gather_dot(hidden, table, torch.cat([targets.unsqueeze(1), neg_ids], dim=1))
    pos = logits[:, :1].double()
    pos_adj = -torch.log(torch.expm1(-beta * F.logsigmoid(pos)).clamp_min(1e-45))
    logits = torch.cat([pos_adj.to(logits.dtype), logits[:, 1:]], dim=1)
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    keep = torch.ones_like(logits)
    keep[:, 1:] = (neg_ids != targets.unsqueeze(1)).to(logits.dtype)
    terms = F.binary_cross_entropy_with_logits(logits, labels, weight=keep, reduction="sum")
    return terms / keep.sum()
