"""``partial_lse``: per-query log-sum-exp over one shard of the catalog, and its backward from the global one.

Rank r of W holds rows ``S_r`` of the item table. The exact softmax CE needs, per query, the log-sum-exp over
all C items: ``lse = log sum_r exp(lse_r)`` with ``lse_r = partial_lse(hidden, S_r)``. Its gradient with
respect to ``hidden`` and ``S_r`` is ``p @ S_r`` and ``p^T @ hidden`` with ``p = exp(hidden @ S_r^T - lse)``
scaled by the upstream gradient: ``partial_lse_backward(grad, hidden, S_r, lse)`` computes both from the
*global* ``lse``, tile by tile, never holding ``[N, n]``. A bfloat16 shard is converted tile by tile.

As an autograd op (``partial_lse`` below), the backward uses the op's own output as ``lse`` (the single-shard
case). The sharded CE (``scalerec.losses.ce``) calls ``partial_lse_backward`` directly with the global lse.
"""
from __future__ import annotations

import torch

from scalerec.ops._lib import hidden_table_grads, load_extension

load_extension()

DEFAULT_TILE = 4096


@torch.library.register_fake("scalerec::partial_lse")
def _partial_lse_fake(hidden, shard, tile):
    torch._check(hidden.dim() == 2 and shard.dim() == 2)
    return hidden.new_empty(hidden.shape[:1])


@torch.library.register_fake("scalerec::partial_lse_backward")
def _partial_lse_backward_fake(grad, hidden, shard, lse, tile):
    return torch.empty_like(hidden), hidden.new_empty(shard.shape)


def _setup_context(ctx, inputs, output):
    hidden, shard, tile = inputs
    ctx.save_for_backward(hidden, shard, output)
    ctx.tile = tile


def _backward(ctx, grad):
    hidden, shard, lse = ctx.saved_tensors
    gh, gs = torch.ops.scalerec.partial_lse_backward(grad, hidden, shard, lse, ctx.tile)
    return hidden_table_grads(ctx, gh, gs.to(shard.dtype), 3)


torch.library.register_autograd("scalerec::partial_lse", _backward, setup_context=_setup_context)


def partial_lse(hidden: torch.Tensor, shard: torch.Tensor, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """``[N]``: log sum_j exp(<hidden_i, shard_j>) over all rows of ``shard [n, d]`` (-inf when n = 0)."""
    return torch.ops.scalerec.partial_lse(hidden, shard, int(tile))


def partial_lse_backward(grad: torch.Tensor, hidden: torch.Tensor, shard: torch.Tensor, lse: torch.Tensor,
                         tile: int = DEFAULT_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_hidden [N, d], grad_shard [n, d])`` of ``sum_i grad_i * lse_i`` restricted to this shard's terms,
    with the softmax taken against the given (global) ``lse``."""
    return torch.ops.scalerec.partial_lse_backward(grad, hidden, shard, lse, int(tile))


def partial_lse_reference(hidden: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch reference: materialises the ``[N, n]`` logits (tests only)."""
    return torch.logsumexp(hidden @ shard.to(hidden.dtype).t(), dim=1)
