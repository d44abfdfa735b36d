"""Exact full-softmax cross-entropy.

``ce`` never holds the [N, C] logits. Its default implementation is the C++ op ``blockwise_ce``
(``scalerec/ops/blockwise_ce.py``): an online log-sum-exp over catalog tiles in the forward and a backward
that recomputes each tile, so memory is O(N + C) besides the table and its gradient (Cut Cross-Entropy's idea).
``impl="chunked"`` selects the pure-PyTorch version below, which walks query chunks instead (memory
O(chunk · C)); it is the reference the op is tested against at scale.
``ce_full`` is the naive materialised version, kept only as a baseline for benchmarks and tests.
"""
from __future__ import annotations

import torch

from scalerec.losses.registry import register_loss
from scalerec.ops.blockwise_ce import DEFAULT_TILE, blockwise_ce


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, table, targets, chunk_size: int):
        N = hidden.size(0)
        lse = hidden.new_empty(N)
        pos = (hidden * table[targets]).sum(-1)
        with torch.no_grad():
            for s in range(0, N, chunk_size):
                logits = hidden[s : s + chunk_size] @ table.t()
                logits[:, 0] = float("-inf")  # padding row is never a class
                lse[s : s + chunk_size] = torch.logsumexp(logits, dim=1)
        ctx.save_for_backward(hidden, table, targets, lse)
        ctx.chunk_size = chunk_size
        return (lse - pos).mean()

    @staticmethod
    def backward(ctx, grad_out):
        hidden, table, targets, lse = ctx.saved_tensors
        N = hidden.size(0)
        scale = grad_out / N
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_t = torch.zeros_like(table) if ctx.needs_input_grad[1] else None
        for s in range(0, N, ctx.chunk_size):
            h = hidden[s : s + ctx.chunk_size]
            p = torch.exp(h @ table.t() - lse[s : s + ctx.chunk_size, None])
            p[:, 0] = 0.0
            p[torch.arange(h.size(0), device=h.device), targets[s : s + ctx.chunk_size]] -= 1.0
            p *= scale
            if grad_h is not None:
                grad_h[s : s + ctx.chunk_size] = p @ table
            if grad_t is not None:
                grad_t.addmm_(p.t(), h)
        return grad_h, grad_t, None, None


def chunked_ce(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024):
    """Exact mean CE over the whole catalog with memory O(chunk_size · C) (pure PyTorch)."""
    if chunk_size <= 0:
        raise ValueError(f"ce: chunk_size must be positive, got {chunk_size}")
    return _ChunkedCE.apply(hidden, table, targets, int(chunk_size))


_CE_IMPLS = ("blockwise", "chunked")


@register_loss("ce", defaults={"impl": "blockwise", "tile": DEFAULT_TILE, "chunk_size": 1024})
def ce_loss(hidden, table, targets, impl="blockwise", tile=DEFAULT_TILE, chunk_size=1024):
    """Exact full-catalog softmax CE, never the [N, C] logits.

    ``impl="blockwise"`` (default): the C++ op, catalog tiles of ``tile`` rows, O(N + C) memory.
    ``impl="chunked"``: pure PyTorch, query chunks of ``chunk_size`` rows, O(chunk_size · C) memory.
    """
    if impl == "blockwise":
        if tile <= 0:
            raise ValueError(f"ce: tile must be positive, got {tile}")
        return blockwise_ce(hidden, table, targets, row_start=1, tile=int(tile)).mean()
    if impl == "chunked":
        return chunked_ce(hidden, table, targets, chunk_size)
    raise ValueError(f"ce: impl must be one of {_CE_IMPLS}, got {impl!r}")


@register_loss("ce_full", defaults={})
def ce_full_loss(hidden, table, targets):
    """Naive CE that materialises the [N, C] logits — a baseline only."""
    logits = hidden @ table.t()
    logits[:, 0] = float("-inf")
    return torch.nn.functional.cross_entropy(logits, targets)
