"""``DenseItemTable``: a whole ``[C + 1, d]`` table seen through the interface of ``ShardedItemTable``.

Code that reads a table row-shard by row-shard (full-ranking evaluation, the sharded losses) takes either:
a ``ShardedItemTable`` (rank r holds its rows) or this view of a local dense table (one "rank" holding
rows 1..C in id order, no process group). Row 0 is the padding item and is never a row of the view.
"""
from __future__ import annotations

from typing import Iterator

import torch


class _IdentityLayout:
    """Item i is local row i - 1 of the only rank."""

    def local_index(self, ids: torch.Tensor) -> torch.Tensor:
        return ids - 1


class DenseItemTable:
    is_sharded_item_table = False

    def __init__(self, weight: torch.Tensor):
        if weight.dim() != 2 or weight.size(0) < 2:
            raise ValueError(f"item table must be [C + 1, d] with C >= 1, got {tuple(weight.shape)}")
        self.full = weight.detach()
        self.weight = self.full[1:]
        self.num_items, self.dim = self.full.size(0) - 1, self.full.size(1)
        self.n_local = self.num_items
        self.group, self.rank, self.world_size = None, 0, 1
        self.compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.layout = _IdentityLayout()

    def tiles(self, tile: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        for s in range(0, self.n_local, tile):
            e = min(s + tile, self.n_local)
            yield s, e, self.weight[s:e].to(self.compute_dtype)

    def local_ids(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        end = self.n_local if end is None else min(end, self.n_local)
        return torch.arange(start + 1, end + 1, device=self.full.device)

    def owned(self, ids: torch.Tensor) -> torch.Tensor:
        return ids > 0

    def gather_replicated(self, ids: torch.Tensor) -> torch.Tensor:
        return self.full[ids].to(self.compute_dtype)
