"""The ``MipsIndex`` interface and what every index shares: input checks and per-query exclusions.

Conventions (the same as the losses'):

* ``item_table`` is ``[C + 1, d]``; row 0 is the padding item and is never returned. Item ids are 1..C.
* ``search(queries [N, d], k, exclude=None) -> (scores [N, k], ids [N, k])``, best first, ``ids`` int64.
  A slot an approximate index could not fill (e.g. IVF with a small ``nprobe``) has id ``-1`` and score
  ``-inf``; exact indexes fill every slot as long as ``k`` items remain after exclusion.
* ``exclude``: ids that must not be returned for a query (a user's history), either a padded
  LongTensor ``[N, H]`` (entries ``<= 0`` are padding) or a sequence of ``N`` id collections.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch


class MipsIndex(abc.ABC):
    """Maximum-inner-product search over the rows 1..C of an item table."""

    num_items: int = 0  # C
    dim: int = 0

    @abc.abstractmethod
    def build(self, item_table: torch.Tensor) -> "MipsIndex":
        """Index ``item_table`` ``[C + 1, d]`` (row 0 = padding) from scratch; returns ``self``."""

    @abc.abstractmethod
    def search(
        self, queries: torch.Tensor, k: int, exclude: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` items by inner product for each query: ``(scores [N, k], ids [N, k])``, best first."""

    def refresh(self, item_table: torch.Tensor) -> "MipsIndex":
        """Bring the index up to date with a changed table (same shape). Default: rebuild."""
        return self.build(item_table)

    @property
    def is_built(self) -> bool:
        return self.num_items > 0

    # ----------------------------------------------------------------- shared checks
    def _check_table(self, item_table: torch.Tensor) -> torch.Tensor:
        table = item_table.weight if isinstance(item_table, torch.nn.Embedding) else item_table
        if not isinstance(table, torch.Tensor) or table.dim() != 2:
            raise ValueError(
                f"{type(self).__name__}: item_table must be a [C+1, d] tensor (row 0 = padding), "
                f"got {type(table).__name__} {tuple(getattr(table, 'shape', ()))}"
            )
        if table.size(0) < 2:
            raise ValueError(
                f"{type(self).__name__}: item_table has {table.size(0)} row(s); it needs the padding row 0 "
                "and at least one item"
            )
        return table.detach()

    def _check_search(self, queries: torch.Tensor, k: int) -> None:
        if not self.is_built:
            raise RuntimeError(f"{type(self).__name__}: call build(item_table) before search()")
        if not isinstance(queries, torch.Tensor) or queries.dim() != 2 or queries.size(1) != self.dim:
            raise ValueError(
                f"{type(self).__name__}: queries must be [N, {self.dim}], got "
                f"{tuple(getattr(queries, 'shape', ()))}"
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{type(self).__name__}: k must be a positive int, got {k!r}")
        if k > self.num_items:
            raise ValueError(
                f"{type(self).__name__}: k={k} exceeds the catalog size C={self.num_items} "
                "(row 0 of the table is padding and never a candidate)"
            )


@dataclass
class Exclusions:
    """Per-query excluded ids as (row, item) pairs sorted by row, plus a padded sorted view.

    ``rows``/``items``: the pairs, deduplicated, sorted by (row, item). ``counts[n]``: how many ids query
    ``n`` excludes. ``padded``: ``[N, H]`` with each row's ids ascending, padded with a value > C
    (for ``searchsorted`` membership tests).
    """

    rows: torch.Tensor
    items: torch.Tensor
    counts: torch.Tensor
    padded: torch.Tensor

    @property
    def max_count(self) -> int:
        return int(self.counts.max()) if self.counts.numel() else 0

    def contains(self, ids: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
        """Boolean ``[n, K]``: whether ``ids[i, j]`` is excluded for query ``row_offset + i``."""
        if self.padded.size(1) == 0:
            return torch.zeros_like(ids, dtype=torch.bool)
        sorted_ex = self.padded[row_offset : row_offset + ids.size(0)].to(ids.device)
        pos = torch.searchsorted(sorted_ex, ids.contiguous())
        pos = pos.clamp_(max=sorted_ex.size(1) - 1)
        return sorted_ex.gather(1, pos) == ids

    def contains_rows(self, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Boolean ``[n, K]``: whether ``ids[i, j]`` is excluded for query ``rows[i]``."""
        if self.padded.size(1) == 0:
            return torch.zeros_like(ids, dtype=torch.bool)
        sorted_ex = self.padded[rows.cpu()].to(ids.device)
        pos = torch.searchsorted(sorted_ex, ids.contiguous()).clamp_(max=sorted_ex.size(1) - 1)
        return sorted_ex.gather(1, pos) == ids

    def slice(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs of queries ``start..stop-1`` as (row - start, item)."""
        lo = int(torch.searchsorted(self.rows, torch.tensor(start)))
        hi = int(torch.searchsorted(self.rows, torch.tensor(stop)))
        return self.rows[lo:hi] - start, self.items[lo:hi]


def normalize_exclude(exclude: Any, num_queries: int, num_items: int) -> Exclusions | None:
    """Turn ``exclude`` (padded LongTensor ``[N, H]`` or a sequence of id collections) into ``Exclusions``.

    Entries ``<= 0`` are padding and ignored; an id above ``num_items`` is an error.
    """
    if exclude is None:
        return None
    if isinstance(exclude, torch.Tensor):
        ex = exclude.detach().to("cpu", torch.int64)
        if ex.dim() == 1:
            ex = ex.unsqueeze(1)
        if ex.dim() != 2 or ex.size(0) != num_queries:
            raise ValueError(
                f"exclude must be [N={num_queries}, H] (padded with 0) or a list of {num_queries} id lists, "
                f"got a tensor of shape {tuple(exclude.shape)}"
            )
        rows = torch.arange(num_queries).unsqueeze(1).expand_as(ex).reshape(-1)
        items = ex.reshape(-1)
    elif isinstance(exclude, Sequence) or hasattr(exclude, "__len__"):
        if len(exclude) != num_queries:
            raise ValueError(f"exclude has {len(exclude)} entries for {num_queries} queries")
        lists = [e.detach().cpu().to(torch.int64).reshape(-1) if isinstance(e, torch.Tensor)
                 else torch.from_numpy(np.asarray(e, dtype=np.int64).reshape(-1)) for e in exclude]
        lens = torch.tensor([len(e) for e in lists], dtype=torch.int64)
        rows = torch.repeat_interleave(torch.arange(num_queries), lens)
        items = torch.cat(lists) if lists else torch.empty(0, dtype=torch.int64)
    else:
        raise ValueError(f"exclude must be a LongTensor [N, H] or a list of id lists, got {type(exclude).__name__}")
    keep = items > 0
    rows, items = rows[keep], items[keep]
    if items.numel() and int(items.max()) > num_items:
        raise ValueError(f"exclude contains item id {int(items.max())} > C={num_items}")
    # dedupe and sort by (row, item)
    key = torch.unique(rows * (num_items + 1) + items)
    rows, items = key // (num_items + 1), key % (num_items + 1)
    counts = torch.bincount(rows, minlength=num_queries)
    H = int(counts.max()) if counts.numel() else 0
    padded = torch.full((num_queries, H), num_items + 1, dtype=torch.int64)
    if H:
        starts = torch.cumsum(counts, 0) - counts
        cols = torch.arange(rows.numel()) - starts[rows]
        padded[rows, cols] = items
    return Exclusions(rows, items, counts, padded)


def finalize_topk(
    scores: torch.Tensor,
    ids: torch.Tensor,
    k: int,
    excl: Exclusions | None,
    row_offset: int = 0,
    presorted: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask excluded/missing candidates of an over-fetched result ``[n, K >= k]`` and keep the best ``k``.

    ``presorted``: the candidates are already best-first (FAISS results). Missing slots come back as
    id -1 with score -inf.
    """
    bad = ids < 1
    if excl is not None:
        bad |= excl.contains(ids, row_offset)
    scores = scores.masked_fill(bad, float("-inf"))
    if scores.size(1) > k or excl is not None or not presorted:
        scores, pos = torch.topk(scores, k, dim=1)
        ids = ids.gather(1, pos)
    ids = ids.masked_fill(torch.isinf(scores) & (scores < 0), -1)
    return scores, ids
