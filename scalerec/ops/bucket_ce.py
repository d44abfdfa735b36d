"""``bucket_ce``: SCE's bucketed cross-entropy (logits of each bucket's queries against its items).

For bucket ``b`` and each of its queries ``n = x_ids[b, i]``: the logits of ``n`` against the items
``y_ids[b]`` with ``targets[n]`` masked among them, the positive logit ``<h_n, t_{targets[n]}>`` appended,
``l = logsumexp - pos``; then per query the max over the buckets it fell in. The op returns
``(loss [N], lse [N], arg [N])``: ``loss`` is 0 and ``arg`` is -1 for a query in no bucket.
Backward: ``grad_hidden`` dense, ``grad_table`` dense of the table's shape but accumulated only into the
touched rows; no ``[n_b, b_x, d]`` / ``[n_b, b_y, d]`` gathers beyond one bucket at a time.
"""
from __future__ import annotations

import torch

from scalerec.ops._lib import hidden_table_grads, load_extension

load_extension()


@torch.library.register_fake("scalerec::bucket_ce")
def _bucket_ce_fake(hidden, table, targets, x_ids, y_ids):
    torch._check(hidden.dim() == 2 and table.dim() == 2 and x_ids.dim() == 2 and y_ids.dim() == 2)
    n = hidden.shape[:1]
    return hidden.new_empty(n), hidden.new_empty(n), hidden.new_empty(n, dtype=torch.long)


@torch.library.register_fake("scalerec::bucket_ce_backward")
def _bucket_ce_backward_fake(grad_loss, hidden, table, targets, x_ids, y_ids, lse, arg):
    return torch.empty_like(hidden), torch.empty_like(table)


def _setup_context(ctx, inputs, output):
    hidden, table, targets, x_ids, y_ids = inputs
    _, lse, arg = output
    ctx.save_for_backward(hidden, table, targets, x_ids, y_ids, lse, arg)
    ctx.mark_non_differentiable(lse, arg)


def _backward(ctx, grad_loss, _grad_lse, _grad_arg):
    hidden, table, targets, x_ids, y_ids, lse, arg = ctx.saved_tensors
    grad_h, grad_t = torch.ops.scalerec.bucket_ce_backward(grad_loss, hidden, table, targets, x_ids, y_ids, lse, arg)
    return hidden_table_grads(ctx, grad_h, grad_t, 5)


torch.library.register_autograd("scalerec::bucket_ce", _backward, setup_context=_setup_context)


def bucket_ce(
    hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, x_ids: torch.Tensor, y_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss [N], covered [N] bool)``: per-query max over its buckets of the bucketed CE (C++ op)."""
    loss, _, arg = torch.ops.scalerec.bucket_ce(hidden, table, targets, x_ids, y_ids)
    return loss, arg >= 0


def bucket_ce_reference(
    hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, x_ids: torch.Tensor, y_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference following the SCE paper's ``sce_forward`` (materialises the gathers)."""
    n_b, b_x = x_ids.shape
    pos = (hidden * table[targets]).sum(-1)
    logits = hidden[x_ids] @ table[y_ids].transpose(1, 2)  # [n_b, b_x, b_y]
    logits = logits.masked_fill(targets[x_ids].unsqueeze(2) == y_ids.unsqueeze(1), float("-inf"))
    logits = torch.cat([logits, pos[x_ids].unsqueeze(2)], dim=2)
    per_bucket = torch.logsumexp(logits, dim=2) - pos[x_ids]  # [n_b, b_x]
    loss = hidden.new_zeros(hidden.size(0))
    loss = loss.scatter_reduce(0, x_ids.reshape(-1), per_bucket.reshape(-1), reduce="amax", include_self=False)
    covered = torch.zeros(hidden.size(0), dtype=torch.bool, device=hidden.device)
    covered[x_ids.reshape(-1)] = True
    return loss, covered
