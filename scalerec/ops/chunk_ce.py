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


@torch.library.register_fake("scalerec::chunk_ce_backward_rows")
def _chunk_ce_backward_rows_fake(grad_loss, hidden, table, targets, x_chunks, y_chunks, n_extra, lse, row_start,
                                 row_end):
    return torch.empty_like(hidden), table.new_empty((row_end - row_start, table.shape[1]))


class _ChunkCEFused(torch.autograd.Function):
    """chunk_ce whose backward updates the table in place, ``rows_per_pass`` rows at a time, instead of
    returning its gradient (see ``chunk_ce_fused``)."""

    @staticmethod
    def forward(ctx, hidden, table, targets, x_chunks, y_chunks, n_extra, update, rows_per_pass):
        loss, lse = torch.ops.scalerec.chunk_ce(hidden, table, targets, x_chunks, y_chunks, int(n_extra))
        ctx.save_for_backward(hidden, targets, x_chunks, y_chunks, lse)
        ctx.table, ctx.n_extra, ctx.update, ctx.rows_per_pass = table, int(n_extra), update, int(rows_per_pass)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, targets, x_chunks, y_chunks, lse = ctx.saved_tensors
        table = ctx.table.detach()  # updated in place below: not saved through autograd, whose version check would fire
        C = table.size(0)
        grad_loss, hidden = grad_loss.contiguous(), hidden.detach()
        grad_hidden = None
        # every range's gradient is computed from the pre-update values of its own rows and the saved lse, so
        # updating the rows of one range before computing the next equals computing the whole gradient first
        for start in range(0, C, ctx.rows_per_pass):
            end = min(C, start + ctx.rows_per_pass)
            gh, g_rows = chunk_ce_backward_rows(grad_loss, hidden, table, targets, x_chunks, y_chunks, ctx.n_extra,
                                                lse, start, end)
            grad_hidden = gh if grad_hidden is None else grad_hidden.add_(gh)
            with torch.no_grad():
                ctx.update(table, start, g_rows)
            del g_rows
        return grad_hidden, None, None, None, None, None, None, None


def chunk_ce_fused(hidden, table, targets, x_chunks, y_chunks, n_extra: int, update,
                   rows_per_pass: int = 1 << 18) -> torch.Tensor:
    """Per-query RECE loss ``[N]`` whose backward applies ``update(table, row_start, grad_rows)`` (e.g.
    ``scalerec.ops.row_update.RowwiseAdagrad``) to ``rows_per_pass`` table rows at a time and gives the table no
    gradient: the dense ``[C, d]`` table gradient is never held (only one ``[rows_per_pass, d]`` block).
    ``hidden`` gets its ordinary gradient. CPU only. Call backward once per forward (the update is applied
    as the backward runs)."""
    if table.device.type != "cpu":
        raise NotImplementedError("chunk_ce_fused: the fused table update has a CPU kernel only; on "
                                  f"{table.device.type} use chunk_ce (dense table gradient)")
    if not callable(update):
        raise TypeError(f"chunk_ce_fused: update must be callable(table, row_start, grad_rows), got {update!r}")
    if rows_per_pass <= 0:
        raise ValueError(f"chunk_ce_fused: rows_per_pass must be positive, got {rows_per_pass}")
    return _ChunkCEFused.apply(hidden, table, targets, x_chunks, y_chunks, int(n_extra), update, int(rows_per_pass))


def chunk_ce_backward_rows(grad_loss, hidden, table, targets, x_chunks, y_chunks, n_extra, lse, row_start, row_end):
    """The chunk_ce backward restricted to table rows ``[row_start, row_end)``: ``(grad_hidden [N, d] — the
    terms of those rows only, grad_rows [row_end - row_start, d])``; summed over a partition of the rows it is
    the full backward."""
    return torch.ops.scalerec.chunk_ce_backward_rows(grad_loss, hidden, table, targets, x_chunks, y_chunks,
                                                     int(n_extra), lse, int(row_start), int(row_end))


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
