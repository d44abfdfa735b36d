"""Exact full-softmax cross-entropy.

``ce`` never holds the [N, C] logits. Its default implementation is the C++ op ``blockwise_ce``
(``scalerec/ops/blockwise_ce.py``): an online log-sum-exp over catalog tiles in the forward and a backward
that recomputes each tile, so memory is O(N + C) besides the table and its gradient (Cut Cross-Entropy's idea).
``impl="reference"`` selects the pure-PyTorch version below, ``chunked_ce``, which walks query chunks
instead (memory O(chunk_size · C)); it is the reference the op is tested against at scale.
``ce_full`` is the naive materialised version, kept only as a baseline for benchmarks and tests.

``sharded_ce`` is the same loss over a row-sharded table: every rank takes the log-sum-exp of all queries
over its own rows with the ``partial_lse`` op (a bfloat16 shard converted tile by tile), the ranks' partial
log-sum-exps are combined by two all-reduces (max, then the rescaled sums), and the op's backward from the
global log-sum-exp gives this rank's share of the query gradient and its own rows' gradient: each rank does
1/W of the N x C work.
"""
from __future__ import annotations

import torch

from scalerec.dist import collectives as coll
from scalerec.losses.registry import register_loss, register_sharded
from scalerec.losses.sharded import eager_sharded_loss
from scalerec.ops.blockwise_ce import DEFAULT_TILE, blockwise_ce
from scalerec.ops.partial_lse import partial_lse, partial_lse_backward, partial_lse_reference


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


_CE_IMPLS = ("cpp", "reference")


def _check(impl: str, tile: int, chunk_size: int) -> None:
    if impl not in _CE_IMPLS:
        raise ValueError(f"ce: impl must be one of {_CE_IMPLS}, got {impl!r}")
    if int(tile) <= 0 or int(chunk_size) <= 0:
        raise ValueError(f"ce: tile and chunk_size must be positive, got {tile} and {chunk_size}")


@register_loss("ce")
def ce_loss(hidden, table, targets, impl="cpp", tile=DEFAULT_TILE, chunk_size=1024):
    """Exact full-catalog softmax CE, never the [N, C] logits.

    ``impl="cpp"`` (default): the C++ op ``blockwise_ce``, catalog tiles of ``tile`` rows, O(N + C) memory.
    ``impl="reference"``: pure PyTorch (``chunked_ce``), query chunks of ``chunk_size`` rows, O(chunk_size · C).
    """
    _check(impl, tile, chunk_size)
    if impl == "cpp":
        return blockwise_ce(hidden, table, targets, row_start=1, tile=int(tile)).mean()
    return chunked_ce(hidden, table, targets, chunk_size)


@register_sharded("ce")
def sharded_ce(hidden, table, targets, impl="cpp", tile=DEFAULT_TILE, chunk_size=1024):
    """Exact CE over a row-sharded table: each rank scores all queries against its own rows only."""
    _check(impl, tile, chunk_size)

    def compute(H, T, table, need_grad):
        N = H.size(0)
        shard = table.weight
        lse_r = partial_lse(H, shard, int(tile)) if impl == "cpp" else partial_lse_reference(H, shard)
        M = coll.all_reduce(lse_r.clone(), "max", table.group)
        part = torch.where(torch.isfinite(lse_r), torch.exp(lse_r - M), torch.zeros_like(lse_r))
        lse = M + torch.log(coll.all_reduce(part, "sum", table.group))
        t_rows = table.gather_replicated(T)
        loss = (lse - (H * t_rows).sum(1)).mean()
        if not need_grad:
            return loss, None, None, None
        g = torch.full((N,), 1.0 / N, dtype=H.dtype)
        if impl == "cpp":
            gH, g_local = partial_lse_backward(g, H, shard, lse, int(tile))
        else:
            rows = shard.to(H.dtype)
            p = torch.exp(H @ rows.t() - lse.unsqueeze(1)) * g.unsqueeze(1)
            gH, g_local = p @ rows, p.t() @ H
        coll.all_reduce(gH, "sum", table.group)
        gH -= t_rows / N
        return loss, gH, [(T, -H / N)], [(torch.arange(table.n_local), g_local)]

    return eager_sharded_loss(hidden, table, targets, compute)


@register_loss("ce_full")
def ce_full_loss(hidden, table, targets):
    """Naive CE that materialises the [N, C] logits — a baseline only."""
    logits = hidden @ table.t()
    logits[:, 0] = float("-inf")
    return torch.nn.functional.cross_entropy(logits, targets)
