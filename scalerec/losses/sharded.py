"""The machinery shared by the sharded losses (``sharded_*`` beside each loss in this package).

A sharded loss takes this rank's queries ``hidden [n_r, d]`` and targets, and a ``ShardedItemTable``. The
contract: with W ranks each holding its own slice of the queries and the same random state, the loss (the mean
over all W slices) and its gradients — for each rank's ``hidden`` and for every table row (on its owner) —
equal the single-process loss on the concatenated batch and the dense table (``tests/test_sharded_losses.py``).

Every sharded loss computes its gradients eagerly in the forward (all collectives happen there), so the
backward needs no communication: it scales the stored gradients by the incoming one, hands this rank's rows of
the query gradient back, and gives the row gradients to the owners' row-sparse optimizer. DeepSpeed's gradient
hooks therefore never interleave with the table's collectives.
"""
from __future__ import annotations

from typing import Callable

import torch

from scalerec.dist import collectives as coll


class _EagerLoss(torch.autograd.Function):
    """Wraps ``compute(H_all, T_all, table, need_grad) -> (loss, grad_H_all, replicated, local)``.

    ``replicated``: ``[(ids, rows)]`` row gradients that every rank holds alike (each owner keeps its own);
    ``local``: ``[(local indices, rows)]`` gradients of this rank's own rows. ``anchor`` is the table's dummy leaf
    so the table receives gradients even when ``hidden`` needs none."""

    @staticmethod
    def forward(ctx, hidden, anchor, table, targets, compute: Callable):
        need_grad = hidden.requires_grad or anchor.requires_grad
        H, sizes = coll.all_gather_varlen(hidden.detach().to(table.compute_dtype), table.group)
        T, _ = coll.all_gather_varlen(targets, table.group, sizes=sizes)
        loss, gH, repl, local = compute(H, T, table, need_grad)
        off = sum(sizes[: table.rank])
        ctx.table = table
        ctx.gH = gH[off : off + hidden.size(0)] if gH is not None else None
        ctx.repl, ctx.local = repl, local
        ctx.hidden_dtype = hidden.dtype
        return loss.detach().to(hidden.dtype)

    @staticmethod
    def backward(ctx, g):
        table = ctx.table
        g = g.to(table.compute_dtype)
        for ids, rows in ctx.repl or ():
            table.add_replicated_grad(ids, rows * g)
        for idx, rows in ctx.local or ():
            table.accumulate_local(idx, rows * g)
        gh = (ctx.gH * g).to(ctx.hidden_dtype) if ctx.gH is not None else None
        return gh, None, None, None, None


def eager_sharded_loss(hidden, table, targets, compute) -> torch.Tensor:
    """The loss of ``compute`` (see ``_EagerLoss``) as a differentiable scalar of ``hidden`` and the table."""
    return _EagerLoss.apply(hidden, table._anchor, table, targets, compute)


def on_fetched_rows(H, table, need_grad: bool, want: torch.Tensor, fn):
    """Run ``fn(H, rows, positions)`` on the rows of ``want`` fetched from their owners (``want`` may differ per
    rank): ``positions[j]`` is the row of ``want[j]`` in ``rows``. Returns ``(loss, grad_H, local)`` where
    ``local`` is what the owners received of the rows' gradient. Collective."""
    ids, loc = torch.unique(want, return_inverse=True)
    rows, handle = table.fetch(ids)
    if not need_grad:
        return fn(H, rows, loc), None, None
    with torch.enable_grad():
        Hl, rl = H.clone().requires_grad_(True), rows.requires_grad_(True)
        loss = fn(Hl, rl, loc)
        gH, gR = torch.autograd.grad(loss, [Hl, rl], allow_unused=True)
    gR = torch.zeros_like(rows) if gR is None else gR
    return loss, gH, [table.send_grads(handle, gR)]
