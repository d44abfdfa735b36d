"""``blockwise_ce``: exact full-catalog softmax CE per query, O(N + C) memory (online log-sum-exp over tiles).

The classes are the table rows ``row_start..C-1`` (``row_start=1`` skips the padding row 0). The op returns
the per-query loss ``lse - <h, t_y>`` and the per-query ``lse`` (saved for the recomputing backward).
"""
from __future__ import annotations

import torch

from scalerec.ops._lib import hidden_table_grads, load_extension

load_extension()

DEFAULT_TILE = 4096


@torch.library.register_fake("scalerec::blockwise_ce")
def _blockwise_ce_fake(hidden, table, targets, row_start, tile):
    torch._check(hidden.dim() == 2 and table.dim() == 2 and targets.dim() == 1)
    return hidden.new_empty(hidden.shape[:1]), hidden.new_empty(hidden.shape[:1])


@torch.library.register_fake("scalerec::blockwise_ce_backward")
def _blockwise_ce_backward_fake(grad_loss, hidden, table, targets, lse, row_start, tile):
    return torch.empty_like(hidden), torch.empty_like(table)


def _setup_context(ctx, inputs, output):
    hidden, table, targets, row_start, tile = inputs
    _, lse = output
    ctx.save_for_backward(hidden, table, targets, lse)
    ctx.row_start, ctx.tile = row_start, tile
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_loss, _grad_lse):
    hidden, table, targets, lse = ctx.saved_tensors
    grad_h, grad_t = torch.ops.scalerec.blockwise_ce_backward(
        grad_loss, hidden, table, targets, lse, ctx.row_start, ctx.tile
    )
    return hidden_table_grads(ctx, grad_h, grad_t, 5)


torch.library.register_autograd("scalerec::blockwise_ce", _backward, setup_context=_setup_context)


def blockwise_ce(
    hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, row_start: int = 1, tile: int = DEFAULT_TILE
) -> torch.Tensor:
    """Per-query exact CE ``[N]`` of ``hidden [N, d]`` against all rows ``row_start..C-1`` of ``table [C, d]``."""
    loss, _ = torch.ops.scalerec.blockwise_ce(hidden, table, targets, int(row_start), int(tile))
    return loss


def blockwise_ce_reference(
    hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, row_start: int = 1
) -> torch.Tensor:
    """Pure-PyTorch reference: materialises the [N, C] logits (tests only)."""
    logits = hidden @ table[row_start:].t()
    pos = (hidden * table[targets]).sum(-1)
    return torch.logsumexp(logits, dim=1) - pos
