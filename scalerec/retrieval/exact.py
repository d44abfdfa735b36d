"""``ExactIndex``: exact MIPS by tiled matmul with a running top-k, never ``N x C`` at once.

The catalog is streamed in tiles of ``tile_size`` rows and the queries in blocks of ``query_batch``;
peak extra memory is ``query_batch x (tile_size + k)`` scores whatever C is. Excluded ids (a user's
history) are masked inside the tile they fall in, so the result is the exact top-k of the remaining
items. The index holds a view of the table (no copy): it always searches the table's current values,
so ``refresh`` only re-points it.
"""
from __future__ import annotations

from typing import Any

import torch

from scalerec.retrieval.base import MipsIndex, normalize_exclude


class ExactIndex(MipsIndex):
    """Exact top-k by inner product over rows 1..C of the item table, on the table's device.

    Args:
        tile_size: catalog rows scored per step.
        query_batch: queries scored per step.
    """

    def __init__(self, item_table: torch.Tensor | None = None, tile_size: int = 16384, query_batch: int = 2048):
        if tile_size < 1 or query_batch < 1:
            raise ValueError(f"ExactIndex: tile_size and query_batch must be >= 1, got {tile_size}, {query_batch}")
        self.tile_size = int(tile_size)
        self.query_batch = int(query_batch)
        self.table: torch.Tensor | None = None
        if item_table is not None:
            self.build(item_table)

    def build(self, item_table: torch.Tensor) -> "ExactIndex":
        table = self._check_table(item_table)
        self.table = table
        self.num_items = table.size(0) - 1
        self.dim = table.size(1)
        return self

    def refresh(self, item_table: torch.Tensor | None = None) -> "ExactIndex":
        """Nothing to recompute: the index reads the table in place. A new table replaces the old one."""
        if item_table is not None:
            self.build(item_table)
        return self

    def memory_bytes(self) -> int:
        """Extra memory the index holds: none (the table is shared, not copied)."""
        return 0

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, exclude: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_search(queries, k)
        table = self.table
        C = self.num_items
        N = queries.size(0)
        excl = normalize_exclude(exclude, N, C)
        compute_dtype = table.dtype if table.dtype in (torch.float32, torch.float64) else torch.float32
        q_all = queries.detach().to(table.device, compute_dtype)
        out_s = torch.empty(N, k, dtype=compute_dtype, device=table.device)
        out_i = torch.empty(N, k, dtype=torch.int64, device=table.device)
        for q0 in range(0, N, self.query_batch):
            q1 = min(N, q0 + self.query_batch)
            q = q_all[q0:q1]
            n = q1 - q0
            ex_cols = ex_rows = None
            if excl is not None:
                r, it = excl.slice(q0, q1)
                order = torch.argsort(it, stable=True)
                ex_rows, ex_cols = r[order].to(table.device), it[order].to(table.device)
                ex_cols_cpu = it[order]
            run_s = torch.full((n, k), float("-inf"), dtype=compute_dtype, device=table.device)
            run_i = torch.full((n, k), -1, dtype=torch.int64, device=table.device)
            for lo in range(1, C + 1, self.tile_size):
                hi = min(C + 1, lo + self.tile_size)
                tile = table[lo:hi]
                if tile.dtype != compute_dtype:
                    tile = tile.to(compute_dtype)
                s = q @ tile.t()  # [n, T]
                if ex_cols is not None and ex_cols.numel():
                    a = int(torch.searchsorted(ex_cols_cpu, torch.tensor(lo)))
                    b = int(torch.searchsorted(ex_cols_cpu, torch.tensor(hi)))
                    if b > a:
                        s[ex_rows[a:b], ex_cols[a:b] - lo] = float("-inf")
                # the tile's own top-k first (no copy of the [n, T] block), then a [n, 2k] merge
                tv, tp = torch.topk(s, min(k, hi - lo), dim=1)
                run_s, pos = torch.topk(torch.cat([run_s, tv], dim=1), k, dim=1)
                tile_ids = torch.cat([run_i, tp + lo], dim=1)
                run_i = tile_ids.gather(1, pos)
            # slots still at -inf (fewer than k items left after exclusion) have no item
            run_i = run_i.masked_fill(torch.isinf(run_s) & (run_s < 0), -1)
            out_s[q0:q1] = run_s
            out_i[q0:q1] = run_i
        return out_s, out_i


def brute_force_topk(
    queries: torch.Tensor, item_table: torch.Tensor, k: int, exclude: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: materialises the full ``N x C`` scores (tests and small catalogs only)."""
    C = item_table.size(0) - 1
    s = queries @ item_table[1:].t()
    excl = normalize_exclude(exclude, queries.size(0), C)
    if excl is not None and excl.items.numel():
        s[excl.rows, excl.items - 1] = float("-inf")
    v, i = torch.topk(s, k, dim=1)
    i = i + 1
    i = i.masked_fill(torch.isinf(v) & (v < 0), -1)
    return v, i
