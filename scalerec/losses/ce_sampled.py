"""CE⁻: sampled softmax with uniform or in-batch negatives, logQ correction, the positive masked among them."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from scalerec.losses.registry import register_loss, sample_uniform_negatives
from scalerec.ops import gather_dot


@register_loss("ce_sampled", defaults={"num_negatives": 256, "sampling": "uniform", "logq_correction": True})
def ce_sampled_loss(hidden, table, targets, num_negatives=256, sampling="uniform", logq_correction=True):
    """Sampled softmax: logits of the positive and of ``num_negatives`` sampled items.

    ``sampling="uniform"``: each query draws its own negatives uniformly from 1..C.
    ``sampling="in_batch"``: the batch's positives serve as shared negatives (popularity-biased).
    With ``logq_correction`` each negative's logit is reduced by log(expected count under the sampler),
    so the sampled softmax is an unbiased-in-expectation estimate of the full one. A negative equal to the
    query's positive is masked out.
    """
    N = hidden.size(0)
    C = table.size(0) - 1
    pos = (hidden * table[targets]).sum(-1, keepdim=True)
    if sampling == "uniform":
        if num_negatives <= 0:
            raise ValueError(f"ce_sampled: num_negatives must be positive, got {num_negatives}")
        neg_ids = sample_uniform_negatives((N, num_negatives), C, hidden.device)
        neg = gather_dot(hidden, table, neg_ids)
        if logq_correction:
            neg = neg - math.log(num_negatives / C)
    elif sampling == "in_batch":
        neg_ids = targets.unsqueeze(0).expand(N, N)
        neg = hidden @ table[targets].t()
        if logq_correction:
            uniq, inv, counts = torch.unique(targets, return_inverse=True, return_counts=True)
            # each in-batch column is one draw from the batch's empirical item distribution
            neg = neg - torch.log(counts[inv].to(neg.dtype)).unsqueeze(0)
    else:
        raise ValueError(f"ce_sampled: sampling must be 'uniform' or 'in_batch', got {sampling!r}")
    neg = neg.masked_fill(neg_ids == targets.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(N, dtype=torch.long, device=hidden.device))
