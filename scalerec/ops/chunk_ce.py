"""``chunk_ce``: RECE's chunked cross-entropy, and ``bucket_argmax``, the streamed bucket assignment it needs.

Per round, queries and items are sorted by bucket id and cut into ``K`` equal chunks (``x_chunks [R, K, cx]``
and ``y_chunks [R, K, cy]`` of row ids, -1 = padding). The queries of chunk ``k`` are scored against the items
of chunks ``k - n_extra .. k + n_extra``; an item a query meets ``count`` times over the rounds has each
occurrence's logit reduced by ``log(count)``; the positive is masked among the candidates and appended.
The op returns ``(loss [N], lse [N])``; the backward recomputes one chunk at a time.
"""
from __future__ import annotations

import torch

from scalerec.ops._lib import hidden_table_grads, load_extension

load_extension()


@torch.library.register_fake("scalerec::chunk_ce")
def _chunk_ce_fake(hidden, table, targets, x_chunks, y_chunks, n_extra):
    torch._check(hidden.dim() == 2 and table.dim() == 2 and x_chunks.dim() == 3 and y_chunks.dim() == 3)
    return hidden.new_empty(hidden.shape[:1]), hidden.new_empty(hidden.shape[:1])


@torch.library.register_fake("scalerec::chunk_ce_backward")
def _chunk_ce_backward_fake(grad_loss, hidden, table, targets, x_chunks, y_chunks, n_extra, lse):
    return torch.empty_like(hidden), torch.empty_like(table)


def _setup_context(ctx, inputs, output):
    hidden, table, targets, x_chunks, y_chunks, n_extra = inputs
    ctx.save_for_backward(hidden, table, targets, x_chunks, y_chunks, output[1])
    ctx.n_extra = n_extra
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _grad_lse):
    hidden, table, targets, x_chunks, y_chunks, lse = ctx.saved_tensors
    grad_h, grad_t = torch.ops.scalerec.chunk_ce_backward(
        grad_loss, hidden, table, targets, x_chunks, y_chunks, ctx.n_extra, lse
    )
    return hidden_table_grads(ctx, grad_h, grad_t, 6)


torch.library.register_autograd("scalerec::chunk_ce", _backward, setup_context=_setup_context)


def chunk_ce(
    hidden: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    x_chunks: torch.Tensor,
    y_chunks: torch.Tensor,
    n_extra: int,
) -> torch.Tensor:
    """Per-query RECE loss ``[N]`` (C++ op)."""
    loss, _ = torch.ops.scalerec.chunk_ce(hidden, table, targets, x_chunks, y_chunks, int(n_extra))
    return loss


def chunk_windows(y_chunks: torch.Tensor, n_extra: int) -> torch.Tensor:
    """``[R, K, (2 n_extra + 1) cy]``: the item ids each query chunk is scored against (-1 = padding)."""
    R, K, cy = y_chunks.shape
    pad = y_chunks.new_full((R, n_extra, cy), -1)
    padded = torch.cat([pad, y_chunks, pad], dim=1)  # [R, K + 2 n_extra, cy]
    return padded.unfold(1, 2 * n_extra + 1, 1).permute(0, 1, 3, 2).reshape(R, K, -1)


def chunk_ce_reference(
    hidden: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    x_chunks: torch.Tensor,
    y_chunks: torch.Tensor,
    n_extra: int,
) -> torch.Tensor:
    """Pure-PyTorch reference in the RECE paper's formulation (materialises every chunk's logits at once)."""
    R, K, cx = x_chunks.shape
    N = hidden.size(0)
    win = chunk_windows(y_chunks, n_extra)  # [R, K, W]
    W = win.size(2)
    logits = hidden[x_chunks.clamp(min=0)] @ table[win.clamp(min=0)].transpose(-1, -2)  # [R, K, cx, W]
    flat_q = x_chunks.reshape(R, K * cx)
    flat_l = logits.reshape(R, K * cx, W)
    flat_i = win.unsqueeze(2).expand(R, K, cx, W).reshape(R, K * cx, W)
    q_logits = hidden.new_full((N, R, W), float("-inf"))
    q_ids = win.new_full((N, R, W), -1)
    for r in range(R):
        valid = flat_q[r] >= 0
        q_logits = q_logits.index_put((flat_q[r, valid], torch.tensor(r)), flat_l[r, valid])
        q_ids[flat_q[r, valid], r] = flat_i[r, valid]
    q_logits, q_ids = q_logits.reshape(N, R * W), q_ids.reshape(N, R * W)
    srt = torch.sort(q_ids, dim=1).values
    counts = torch.searchsorted(srt, q_ids, side="right") - torch.searchsorted(srt, q_ids, side="left")
    q_logits = q_logits - torch.log(counts.to(q_logits.dtype))
    q_logits = q_logits.masked_fill((q_ids < 0) | (q_ids == targets.unsqueeze(1)), float("-inf"))
    pos = (hidden * table[targets]).sum(-1)
    return torch.logsumexp(torch.cat([q_logits, pos.unsqueeze(1)], dim=1), dim=1) - pos


def bucket_argmax(directions: torch.Tensor, table: torch.Tensor, row_start: int = 0, tile: int = 65536) -> torch.Tensor:
    """``[C - row_start]``: for each row of ``table[row_start:]``, the direction of largest inner product.

    Streamed over the table in tiles of ``tile`` rows, so the ``[C, n_b]`` projections are never held.
    """
    if tile <= 0:
        raise ValueError(f"bucket_argmax: tile must be positive, got {tile}")
    with torch.no_grad():
        out = torch.empty(table.size(0) - row_start, dtype=torch.long, device=table.device)
        for s in range(row_start, table.size(0), tile):
            out[s - row_start : s - row_start + tile] = (table[s : s + tile] @ directions.t()).argmax(dim=1)
        return out
