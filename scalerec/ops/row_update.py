"""Row-range optimizer updates applied in place, for losses that update the item table inside their backward.

For a catalog of 10^7+ items the dense ``[C, d]`` table gradient alone is as large as the table (2.4 GiB at
C = 10^7, d = 64, fp32). A loss whose backward produces the table gradient a range of rows at a time (RECE's
``chunk_ce_fused``) can hand each range to one of these updaters and drop it, so the full gradient never
exists (the fused-optimizer idea of TorchRec/FBGEMM's embedding tables). Each updater is called as
``update(table, row_start, grad_rows)`` under ``torch.no_grad()`` with the gradient of rows
``row_start : row_start + len(grad_rows)``; rows whose gradient is exactly zero are left untouched (and keep
their state), as with a row-sparse optimizer.

The rules are the ones of the sharded table's own optimizer (``scalerec.models.sharded_table``): SGD, and
row-wise Adagrad (one fp32 accumulator per row: the mean of g^2 over the row).
"""
from __future__ import annotations

import torch


def adagrad_rows_(w: torch.Tensor, g: torch.Tensor, s: torch.Tensor, lr: float, eps: float) -> None:
    """Row-wise Adagrad on rows ``w [n, d]`` with gradient ``g`` and accumulators ``s [n]``, both in place:
    ``s += mean_j g^2``, ``w -= lr * g / (sqrt(s) + eps)``. Shared by the updaters below and the sharded table."""
    s.add_(g.pow(2).mean(1).to(s.dtype))
    w.addcdiv_(g, (s.to(w.dtype).sqrt() + eps).unsqueeze(1), value=-lr)


class RowSGD:
    """``w -= lr * g`` on the rows that got a gradient."""

    def __init__(self, lr: float):
        if not lr > 0:
            raise ValueError(f"RowSGD: lr must be positive, got {lr}")
        self.lr = float(lr)

    @torch.no_grad()
    def __call__(self, table: torch.Tensor, row_start: int, grad_rows: torch.Tensor) -> None:
        rows = table.narrow(0, row_start, grad_rows.size(0))
        rows.add_(grad_rows.to(rows.dtype), alpha=-self.lr)


class RowwiseAdagrad:
    """Row-wise Adagrad: ``s_i += mean_j g_ij^2``; ``w_i -= lr * g_i / (sqrt(s_i) + eps)``. A row with a zero
    gradient keeps its values and state exactly (both updates add zero; ``eps > 0``). The state is one float
    per table row (40 MB at 10^7 rows); the update runs ``block`` rows at a time, so its temporaries stay small
    next to the gradient block it is given."""

    def __init__(self, num_rows: int, lr: float, eps: float = 1e-10, device: torch.device | str = "cpu",
                 block: int = 1 << 16):
        if not lr > 0:
            raise ValueError(f"RowwiseAdagrad: lr must be positive, got {lr}")
        if not eps > 0:
            raise ValueError(f"RowwiseAdagrad: eps must be positive, got {eps}")
        if num_rows <= 0:
            raise ValueError(f"RowwiseAdagrad: num_rows must be positive, got {num_rows}")
        self.lr, self.eps, self.block = float(lr), float(eps), int(block)
        self.sum = torch.zeros(int(num_rows), dtype=torch.float32, device=device)

    @torch.no_grad()
    def __call__(self, table: torch.Tensor, row_start: int, grad_rows: torch.Tensor) -> None:
        n = grad_rows.size(0)
        if row_start < 0 or row_start + n > self.sum.numel() or table.size(0) != self.sum.numel():
            raise ValueError(f"RowwiseAdagrad: rows {row_start}:{row_start + n} of a {table.size(0)}-row table, "
                             f"but the state was made for {self.sum.numel()} rows")
        for a in range(0, n, self.block):
            b = min(n, a + self.block)
            rows = table[row_start + a: row_start + b]
            w = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()  # bf16 storage: fp32 math
            g = grad_rows[a:b].to(w.dtype)
            adagrad_rows_(w, g, self.sum[row_start + a: row_start + b], self.lr, self.eps)
            if w is not rows:
                rows.copy_(w)
