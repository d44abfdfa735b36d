"""``bucket_topk``: for each direction, the top-k rows of a table by inner product, streamed over the table.

The C++ op keeps a running per-direction top-k and scores one ``[n_b, tile]`` block at a time, so the
``[n_b, C]`` score matrix is never held. It is a selection (no gradient), used by SCE on both the item side
(top ``b_y`` items per bucket) and the query side (top ``b_x`` queries per bucket).
"""
from __future__ import annotations

import torch

from scalerec.ops._lib import load_extension

load_extension()

DEFAULT_TILE = 4096


@torch.library.register_fake("scalerec::bucket_topk")
def _bucket_topk_fake(directions, table, k, row_start, tile):
    torch._check(directions.dim() == 2 and table.dim() == 2)
    shape = (directions.shape[0], k)
    return directions.new_empty(shape), directions.new_empty(shape, dtype=torch.long)


def bucket_topk(
    directions: torch.Tensor, table: torch.Tensor, k: int, row_start: int = 0, tile: int = DEFAULT_TILE
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` ``[n_b, k]``: the k rows of ``table[row_start:]`` with the largest ``<direction, row>``.

    Sorted by decreasing score, ties broken by the smaller row id; indices are rows of ``table`` (offset
    by ``row_start`` already). Never differentiable: it only selects candidates.
    """
    with torch.no_grad():
        return torch.ops.scalerec.bucket_topk(directions, table, int(k), int(row_start), int(tile))


def bucket_topk_reference(
    directions: torch.Tensor, table: torch.Tensor, k: int, row_start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference: materialises the ``[n_b, C]`` scores and calls ``torch.topk``."""
    with torch.no_grad():
        values, idx = torch.topk(directions @ table[row_start:].t(), k, dim=1)
        return values, idx + row_start
