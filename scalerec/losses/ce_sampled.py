"""CE⁻: sampled softmax with uniform or in-batch negatives, logQ correction, the positive masked among them.

``sharded_ce_sampled`` is the same loss over a row-sharded table: the negatives of the whole batch are drawn
from the common random state (the same draw as one process makes), each rank fetches from their owners only
the rows its own queries need and computes their terms; one all-reduce sums the loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from scalerec.dist import collectives as coll
from scalerec.losses.registry import register_loss, register_sharded, sample_uniform_negatives
from scalerec.losses.sharded import eager_sharded_loss, on_fetched_rows
from scalerec.ops import gather_dot


@register_loss("ce_sampled")
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


@register_sharded("ce_sampled")
def sharded_ce_sampled(hidden, table, targets, num_negatives=256, sampling="uniform", logq_correction=True):
    """``ce_sampled`` over a row-sharded table: this rank's queries only, rows fetched from their owners."""
    C, n_mine = table.num_items, hidden.size(0)
    if sampling not in ("uniform", "in_batch"):
        raise ValueError(f"ce_sampled: sampling must be 'uniform' or 'in_batch', got {sampling!r}")
    if sampling == "uniform" and num_negatives <= 0:
        raise ValueError(f"ce_sampled: num_negatives must be positive, got {num_negatives}")
    sizes = coll.all_gather_sizes(n_mine, table.group)
    off = sum(sizes[: table.rank])

    def compute(H, T, table, need_grad):
        N = H.size(0)
        mine = slice(off, off + n_mine)
        Tm = T[mine]
        if sampling == "uniform":
            neg_ids = sample_uniform_negatives((N, int(num_negatives)), C, H.device)[mine]
            want = torch.cat([Tm, neg_ids.reshape(-1)])
        else:
            neg_ids = T.unsqueeze(0).expand(n_mine, N)
            want = torch.cat([Tm, T])

        def fn(Hl, rows, loc):
            h = Hl[mine]
            t_rows = rows[loc[:n_mine]]
            pos = (h * t_rows).sum(-1, keepdim=True)
            if sampling == "uniform":
                neg = torch.einsum("nd,nkd->nk", h, rows[loc[n_mine:].view_as(neg_ids)])
                if logq_correction:
                    neg = neg - math.log(num_negatives / C)
            else:
                neg = h @ rows[loc[n_mine:]].t()
                if logq_correction:
                    _, inv, counts = torch.unique(T, return_inverse=True, return_counts=True)
                    neg = neg - torch.log(counts[inv].to(neg.dtype)).unsqueeze(0)
            neg = neg.masked_fill(neg_ids == Tm.unsqueeze(1), -math.inf)
            logits = torch.cat([pos, neg], 1)
            return F.cross_entropy(logits, torch.zeros(n_mine, dtype=torch.long), reduction="sum") / N

        part, gH, local = on_fetched_rows(H, table, need_grad, want, fn)
        loss = coll.all_reduce(part.detach().clone(), "sum", table.group)
        return loss, gH, None, local  # gH is non-zero on this rank's queries only: all that it hands back

    return eager_sharded_loss(hidden, table, targets, compute)
