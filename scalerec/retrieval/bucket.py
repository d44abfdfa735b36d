"""``BucketIndex``: SCE's random-bucket search behind the ``MipsIndex`` interface.

SCE (docs/losses.md) finds candidates without an index structure: ``n_buckets`` random directions; for each,
the top ``bucket_size`` items by inner product, found by streaming over the catalog in tiles with a running
per-bucket top-k (never ``n_buckets x C`` at once). As an index:

* ``build(table)``: draws the directions (seeded) and computes every bucket's top items.
* ``search(q, k)``: each query visits its ``n_probe`` best-aligned buckets; their items are scored exactly
  against the query and the best ``k`` of the union kept. Recall grows with ``n_probe`` and
  ``bucket_size``; slots that the visited buckets cannot fill come back as id -1 / score -inf.
* ``refresh(table)``: recomputes the buckets' items with the same directions.

The per-bucket top-k is the extension's streaming bucket top-k op (``scalerec.ops.bucket_topk``, the one SCE
uses); a search scores each visited bucket's queries against its items with one dense matmul.
"""
from __future__ import annotations

from typing import Any

import torch

from scalerec.retrieval.base import MipsIndex, finalize_topk, normalize_exclude
from scalerec.ops.bucket_topk import bucket_topk


def _bucket_topk(directions: torch.Tensor, table: torch.Tensor, b: int, tile_size: int) -> torch.Tensor:
    """Ids (1..C) of the top ``b`` items of rows 1..C of ``table`` for each direction, ``[n_b, b]``."""
    _, ids = bucket_topk(directions.contiguous(), table, b, row_start=1, tile=tile_size)
    return ids


class BucketIndex(MipsIndex):
    """Random-bucket candidate search (SCE) with exact rescoring of the candidates.

    Args:
        n_buckets: number of random directions.
        bucket_size: items per bucket (``b_y``).
        n_probe: buckets each query visits.
        seed: seed of the directions.
    """

    def __init__(
        self,
        item_table: torch.Tensor | None = None,
        *,
        n_buckets: int = 256,
        bucket_size: int = 256,
        n_probe: int = 8,
        seed: int = 0,
        tile_size: int = 16384,
    ):
        if min(n_buckets, bucket_size, n_probe) < 1:
            raise ValueError(
                f"BucketIndex: n_buckets, bucket_size, n_probe must be >= 1, got {n_buckets}, {bucket_size}, {n_probe}"
            )
        if n_probe > n_buckets:
            raise ValueError(f"BucketIndex: n_probe={n_probe} exceeds n_buckets={n_buckets}")
        self.n_buckets, self.bucket_size, self.n_probe = int(n_buckets), int(bucket_size), int(n_probe)
        self.seed = int(seed)
        self.tile_size = int(tile_size)
        self.table: torch.Tensor | None = None
        self.directions: torch.Tensor | None = None
        self.bucket_items: torch.Tensor | None = None
        if item_table is not None:
            self.build(item_table)

    def build(self, item_table: torch.Tensor) -> "BucketIndex":
        table = self._check_table(item_table)
        C, d = table.size(0) - 1, table.size(1)
        gen = torch.Generator().manual_seed(self.seed)
        dtype = table.dtype if table.dtype in (torch.float32, torch.float64) else torch.float32
        self.directions = torch.randn(self.n_buckets, d, generator=gen, dtype=dtype).to(table.device)
        self.table, self.num_items, self.dim = table, C, d
        self._fill_buckets()
        return self

    def _fill_buckets(self) -> None:
        b = min(self.bucket_size, self.num_items)
        self.bucket_items = _bucket_topk(self.directions, self.table, b, self.tile_size)

    def refresh(self, item_table: torch.Tensor | None = None) -> "BucketIndex":
        """Recompute each bucket's items from the (updated) table, keeping the directions."""
        if item_table is None:
            self._fill_buckets()
            return self
        table = self._check_table(item_table)
        if self.directions is None or table.shape != self.table.shape:
            return self.build(table)
        self.table = table
        self._fill_buckets()
        return self

    def memory_bytes(self) -> int:
        if self.bucket_items is None:
            return 0
        return self.bucket_items.numel() * 8 + self.directions.numel() * self.directions.element_size()

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, exclude: Any = None, query_batch: int = 8192):
        """Each query's ``n_probe`` buckets are scored bucket by bucket (one dense ``[queries in bucket, b]``
        matmul each, no per-query gathers); per query the best ``k`` of every visited bucket are merged,
        duplicates (an item in two of its buckets) dropped, and the best ``k`` kept."""
        self._check_search(queries, k)
        N = queries.size(0)
        excl = normalize_exclude(exclude, N, self.num_items)
        dtype = self.directions.dtype
        q_all = queries.detach().to(self.table.device, dtype)
        kb = min(k, self.bucket_items.size(1))
        out_s, out_i = [], []
        for q0 in range(0, N, query_batch):
            q = q_all[q0 : q0 + query_batch]
            n = q.size(0)
            probe = torch.topk(q @ self.directions.t(), self.n_probe, dim=1).indices  # [n, n_probe]
            res_s = q.new_full((n, self.n_probe, kb), float("-inf"))
            res_i = torch.full((n, self.n_probe, kb), -1, dtype=torch.int64, device=q.device)
            flat = probe.reshape(-1)
            order = torch.argsort(flat, stable=True)
            buckets, counts = torch.unique_consecutive(flat[order], return_counts=True)
            pair_q = order // self.n_probe
            pair_slot = order % self.n_probe
            # the per-bucket ops are small: intra-op threads cost more to wake than they save
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                self._score_buckets(q, q0, buckets, counts, pair_q, pair_slot, excl, kb, res_s, res_i)
            finally:
                torch.set_num_threads(threads)
            cand = res_i.reshape(n, -1)
            scores = res_s.reshape(n, -1)
            # an item found through two buckets of the same query counts once
            cand, perm = torch.sort(cand, dim=1)
            scores = scores.gather(1, perm)
            dup = torch.zeros_like(cand, dtype=torch.bool)
            dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
            cand = cand.masked_fill(dup, -1)
            if cand.size(1) < k:  # fewer candidates than asked: pad with empty slots
                pad = k - cand.size(1)
                cand = torch.cat([cand, cand.new_full((n, pad), -1)], 1)
                scores = torch.cat([scores, scores.new_full((n, pad), float("-inf"))], 1)
            s, i = finalize_topk(scores, cand, k, None, presorted=False)
            out_s.append(s)
            out_i.append(i)
        return torch.cat(out_s), torch.cat(out_i)

    def _score_buckets(self, q, q0, buckets, counts, pair_q, pair_slot, excl, kb, res_s, res_i) -> None:
        b = self.bucket_items.size(1)
        dtype = q.dtype
        start = 0
        for bucket, cnt in zip(buckets.tolist(), counts.tolist()):
            rows, slots = pair_q[start : start + cnt], pair_slot[start : start + cnt]
            start += cnt
            items = self.bucket_items[bucket]  # [b]
            sc = q[rows] @ self.table[items].to(dtype).t()  # [cnt, b]
            if excl is not None:
                ids = items.unsqueeze(0).expand(cnt, b)
                sc = sc.masked_fill(excl.contains_rows(ids, rows + q0), float("-inf"))
            v, pos = torch.topk(sc, kb, dim=1)
            res_s[rows, slots] = v
            res_i[rows, slots] = items[pos]
