"""``gather_dot``: logits of each query against its own candidate rows, without the [N, K, d] gather."""
from __future__ import annotations

import torch

from scalerec.ops._lib import load_extension

load_extension()


@torch.library.register_fake("scalerec::gather_dot")
def _gather_dot_fake(x, table, idx):
    torch._check(x.dim() == 2 and table.dim() == 2 and idx.dim() == 2)
    return x.new_empty(idx.shape)


@torch.library.register_fake("scalerec::gather_dot_backward")
def _gather_dot_backward_fake(grad, x, table, idx):
    return torch.empty_like(x), torch.empty_like(table)


def _setup_context(ctx, inputs, output):
    x, table, idx = inputs
    ctx.save_for_backward(x, table, idx)


def _backward(ctx, grad):
    x, table, idx = ctx.saved_tensors
    grad_x, grad_table = torch.ops.scalerec.gather_dot_backward(grad, x, table, idx)
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        grad_table if ctx.needs_input_grad[1] else None,
        None,
    )


torch.library.register_autograd("scalerec::gather_dot", _backward, setup_context=_setup_context)


def gather_dot(x: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[n, k] = <x[n], table[idx[n, k]]>`` for ``x [N, d]``, ``table [C, d]``, ``idx [N, K]`` (int64)."""
    return torch.ops.scalerec.gather_dot(x, table, idx)


def gather_dot_reference(x: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch reference (materialises the [N, K, d] gather; for tests only)."""
    return torch.einsum("nd,nkd->nk", x, table[idx])
