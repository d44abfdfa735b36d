"""Losses over a row-sharded item table (``ShardedItemTable``): each rank scores against its own rows.

The contract: with W ranks, each holding its own slice of the queries, and the same random state on every
rank, the loss (the mean over all W slices) and its gradients — for each rank's ``hidden`` and for each
table row (on its owner) — equal the single-process loss on the concatenated batch and the dense table.

* ``ce``: queries are all-gathered; every rank computes a per-query partial (max, sum-exp) over its shard
  tile by tile (fp32), one all-reduce of the max and one of the rescaled sums give the exact log-sum-exp; the
  positive rows come from their owners. Row gradients stay on their owners; the query gradient is the sum of
  the ranks' partial products (one all-reduce).
* ``sce``: the bucket directions come from the common random state (identical on every rank); each rank
  takes its local per-bucket top-``b_y`` streamed over its shard, the global top-``b_y`` per bucket is merged
  from the ranks' candidates (one all-gather of ``n_b x b_y`` scores and ids), the candidate and positive
  rows are fetched from their owners; then the single-process SCE runs on those rows.
* ``ce_sampled``: the negatives are drawn from the common random state; their rows come from the owners.

Every function computes the gradients eagerly in its forward (all collectives happen there), so the
backward pass needs no communication: it only scales the stored gradients by the incoming one and hands the
row gradients to their owners' row-sparse optimizer.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from scalerec.losses.registry import sample_uniform_negatives
from scalerec.models import collectives as coll


class _EagerLoss(torch.autograd.Function):
    """Wraps a ``compute(H_all, T_all) -> (loss, grad_H_all, [(ids, grad_rows)], local_grads)`` result.

    ``hidden`` is this rank's slice; ``anchor`` is the table's dummy leaf so the table receives gradients even
    when ``hidden`` needs none. The backward returns this rank's rows of the query gradient and pushes the row
    gradients (replicated ones filtered to their owner, local ones as they are) into the table.
    """

    @staticmethod
    def forward(ctx, hidden, anchor, table, targets, compute: Callable):
        need_grad = hidden.requires_grad or anchor.requires_grad
        H, sizes = coll.all_gather_varlen(hidden.detach().float(), table.group)
        T, _ = coll.all_gather_varlen(targets, table.group, sizes=sizes)
        loss, gH, repl, local = compute(H, T, table, need_grad)
        off = sum(sizes[: table.rank])
        ctx.table = table
        ctx.gH = gH[off : off + hidden.size(0)] if gH is not None else None
        ctx.repl, ctx.local = repl, local
        ctx.hidden_dtype = hidden.dtype
        return loss.detach().to(hidden.dtype)

    @staticmethod
    def backward(ctx, g):
        table = ctx.table
        g = g.float()
        for ids, rows in ctx.repl or ():
            table.add_replicated_grad(ids, rows * g)
        for idx, rows in ctx.local or ():
            table.accumulate_local(idx, rows * g)
        gh = (ctx.gH * g).to(ctx.hidden_dtype) if ctx.gH is not None else None
        return gh, None, None, None, None


def _apply(hidden, table, targets, compute):
    return _EagerLoss.apply(hidden, table._anchor, table, targets, compute)


# ---------------------------------------------------------------------------------------------- ce
def dist_ce(hidden, table, targets, impl="blockwise", tile=4096, chunk_size=1024):
    """Exact full-catalog CE over a row-sharded table (``impl``/``chunk_size`` accepted for config parity)."""
    if int(tile) <= 0:
        raise ValueError(f"ce: tile must be positive, got {tile}")
    tile = int(tile)

    def compute(H, T, table, need_grad):
        N = H.size(0)
        m = torch.full((N,), -math.inf)
        s = torch.zeros(N)
        for _, _, rows in table.tiles(tile):
            logits = H @ rows.t()
            new_m = torch.maximum(m, logits.max(1).values)
            s = s * torch.exp(m - new_m) + torch.exp(logits - new_m.unsqueeze(1)).sum(1)
            m = new_m
        M = coll.all_reduce(m.clone(), "max", table.group)
        s = torch.where(torch.isfinite(m), s * torch.exp(m - M), torch.zeros_like(s))
        lse = M + torch.log(coll.all_reduce(s, "sum", table.group))
        t_rows = table.gather_replicated(T)
        loss = (lse - (H * t_rows).sum(1)).mean()
        if not need_grad:
            return loss, None, None, None
        gH = torch.zeros_like(H)
        g_local = torch.empty(table.n_local, table.dim)
        for a, b, rows in table.tiles(tile):
            p = torch.exp(H @ rows.t() - lse.unsqueeze(1)).div_(N)
            gH.addmm_(p, rows)
            g_local[a:b] = p.t() @ H
        coll.all_reduce(gH, "sum", table.group)
        gH -= t_rows / N
        return loss, gH, [(T, -H / N)], [(torch.arange(table.n_local), g_local)]

    return _apply(hidden, table, targets, compute)


# ---------------------------------------------------------------------------------------------- sce
_SCAN_ROWS = 1 << 18  # shard rows converted to fp32 at a time for the candidate search (two alive at once)


def local_bucket_topk(table, directions: torch.Tensor, k: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's top-``k`` rows per direction (scores, global ids) with the streaming ``bucket_topk`` op."""
    from scalerec.ops.bucket_topk import bucket_topk

    n_b = directions.size(0)
    best_s = torch.full((n_b, 0), -math.inf)
    best_i = torch.zeros((n_b, 0), dtype=torch.long)
    for a, b, rows in table.tiles(_SCAN_ROWS):
        s, i = bucket_topk(directions, rows, min(k, b - a), row_start=0, tile=tile)
        cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, table.local_ids(a, b)[i]], 1)
        best_s, pos = torch.topk(cat_s, min(k, cat_s.size(1)), dim=1)
        best_i = torch.gather(cat_i, 1, pos)
    return best_s, best_i


def global_bucket_topk(table, directions: torch.Tensor, k: int, tile: int) -> torch.Tensor:
    """The global top-``k`` item ids per direction ``[n_b, k]``: the ranks' local top-k, merged."""
    s, i = local_bucket_topk(table, directions, k, tile)
    if table.world_size > 1:
        n_b, pad = directions.size(0), k - s.size(1)  # a shard smaller than k
        s = torch.cat([s, torch.full((n_b, pad), -math.inf)], 1)
        i = torch.cat([i, torch.zeros((n_b, pad), dtype=torch.long)], 1)
        same = [k] * table.world_size  # every rank sends k candidates per bucket: no size exchange
        S, _ = coll.all_gather_varlen(s.t().contiguous(), table.group, sizes=same)  # [W * k, n_b]
        I, _ = coll.all_gather_varlen(i.t().contiguous(), table.group, sizes=same)
        s, i = S.t(), I.t()
    return torch.gather(i, 1, torch.topk(s, k, dim=1).indices)


def dist_sce(hidden, table, targets, n_buckets=None, bucket_size_x=None, bucket_size_y=256, mix_x=False,
             impl="cpp", tile=4096, generator=None, sparse_grad=False):
    """SCE over a row-sharded table: the same directions on every rank (common random state), local top-b_y
    per bucket merged into the global top-b_y, candidate and positive rows fetched from their owners; then the
    single-process ``sce`` runs on the compact table of those rows with the same directions. The compact
    table holds every bucket's global top-b_y, so its top-b_y per bucket is the same set: the loss and the
    gradients equal the single-process SCE on the whole table. (``sparse_grad`` is accepted for config parity:
    the sharded table always receives row gradients of the touched rows only.)"""
    from scalerec.losses.sce import default_n_buckets, sce, sce_directions

    def compute(H, T, table, need_grad):
        N = H.size(0)
        n_b = default_n_buckets(N) if n_buckets is None else int(n_buckets)
        if n_b <= 0:
            raise ValueError(f"sce: n_buckets must be positive, got {n_buckets}")
        b_y = int(bucket_size_y)
        if b_y <= 0:
            raise ValueError(f"sce: bucket_size_y must be positive, got {b_y}")
        directions = sce_directions(H, n_b, mix_x=bool(mix_x), generator=generator)
        y_ids = global_bucket_topk(table, directions, min(b_y, table.num_items), int(tile))

        def fn(Hl, rows, loc):
            compact = torch.cat([rows.new_zeros(1, rows.size(1)), rows])  # row 0: padding
            return sce(Hl, compact, loc[: N] + 1, bucket_size_x=bucket_size_x, bucket_size_y=b_y, impl=impl,
                       tile=int(tile), directions=directions)

        return _on_rows(H, T, table, need_grad, torch.cat([T, y_ids.reshape(-1)]), fn)

    return _apply(hidden, table, targets, compute)


def _on_rows(H, T, table, need_grad, want: torch.Tensor, fn):
    """Fetch the rows of ``want`` from their owners, run ``fn(H, rows, positions_of_want)`` with autograd."""
    ids, loc = torch.unique(want, return_inverse=True)
    rows = table.gather_replicated(ids)
    if not need_grad:
        return fn(H, rows, loc), None, None, None
    with torch.enable_grad():
        Hl, rl = H.clone().requires_grad_(True), rows.requires_grad_(True)
        loss = fn(Hl, rl, loc)
        gH, gR = torch.autograd.grad(loss, [Hl, rl])
    return loss, gH, [(ids, gR)], None


# ---------------------------------------------------------------------------------------------- rece
def _item_chunks(table, directions_r: torch.Tensor, cy: int, tile: int) -> torch.Tensor:
    """Chunk id of each local row for one round: items sorted (stably) by bucket, then cut every ``cy``.

    The global order is bucket, then rank, then local order: with the ``block`` layout (contiguous id ranges)
    that is the single-process order (bucket, then id); other layouts give an equally valid order within a
    bucket. Only the per-bucket counts of every rank are communicated (one all-gather of ``n_b`` ints)."""
    from scalerec.ops.chunk_ce import bucket_argmax

    K = directions_r.size(0)
    buckets = torch.empty(table.n_local, dtype=torch.long)
    for a, b, rows in table.tiles(_SCAN_ROWS):
        buckets[a:b] = bucket_argmax(directions_r, rows, row_start=0, tile=tile)
    counts = torch.bincount(buckets, minlength=K)
    allc, _ = coll.all_gather_varlen(counts.unsqueeze(0), table.group)  # [W, K]
    start = torch.cumsum(allc.sum(0), 0) - allc.sum(0) + allc[: table.rank].sum(0)  # first slot of my bucket b
    order = torch.sort(buckets, stable=True).indices
    sb = buckets[order]
    within = torch.arange(table.n_local) - (torch.cumsum(counts, 0) - counts)[sb]
    pos = torch.empty(table.n_local, dtype=torch.long)
    pos[order] = start[sb] + within
    return pos // cy


def dist_rece(hidden, table, targets, n_buckets=None, n_extra_chunks=1, rounds=1, impl="cpp", tile=65536,
              generator=None, fused_update=None, rows_per_pass=1 << 18):
    """RECE over a row-sharded table. Queries are all-gathered and chunked identically on every rank; each
    rank scores every query chunk against the rows it owns in that chunk's item neighbourhood (union over
    rounds: the single-process -log(count) correction makes a duplicate count once), a per-query partial
    (max, sum-exp) is all-reduced as in ``ce``. Equal to the single-process RECE with the ``block`` layout."""
    from scalerec.losses.rece import default_n_buckets

    if fused_update is not None:
        raise ValueError("rece: fused_update is for a single-process dense table; the row-sharded table has its own "
                         "row-sparse optimizer (scaleout.table.optimizer)")
    n_ec = int(n_extra_chunks)
    if n_ec < 0:
        raise ValueError(f"rece: n_extra_chunks must be >= 0, got {n_extra_chunks}")
    if int(rounds) <= 0:
        raise ValueError(f"rece: rounds must be positive, got {rounds}")

    def compute(H, T, table, need_grad):
        N, C, d = H.size(0), table.num_items, H.size(1)
        K = default_n_buckets(N, C, n_ec) if n_buckets is None else int(n_buckets)
        if K <= 0:
            raise ValueError(f"rece: n_buckets must be positive, got {n_buckets}")
        R = int(rounds)
        dirs = torch.randn(R, K, d, generator=generator, dtype=H.dtype)
        cx, cy = math.ceil(N / K), math.ceil(C / K)
        qchunk = torch.empty(R, N, dtype=torch.long)
        ichunk = torch.empty(R, table.n_local, dtype=torch.long)
        for r in range(R):
            qb = (H @ dirs[r].t()).argmax(1)
            qchunk[r, torch.sort(qb, stable=True).indices] = torch.arange(N) // cx
            ichunk[r] = _item_chunks(table, dirs[r], cy, int(tile))
        local_ids = table.local_ids()
        by_chunk = [torch.sort(ichunk[r], stable=True) for r in range(R)]

        def blocks():
            """(query idx, local row idx, mask of the pairs that count) per (round, query chunk)."""
            for r in range(R):
                sc, si = by_chunk[r]
                for k in range(K):
                    q = (qchunk[r] == k).nonzero().squeeze(1)
                    lo, hi = torch.searchsorted(sc, torch.tensor([k - n_ec, k + n_ec + 1]))
                    items = si[lo:hi]
                    if q.numel() == 0 or items.numel() == 0:
                        continue
                    keep = local_ids[items].unsqueeze(0) != T[q].unsqueeze(1)  # the positive is masked
                    for r0 in range(r):  # counted already in an earlier round: a duplicate
                        keep &= (qchunk[r0, q].unsqueeze(1) - ichunk[r0, items].unsqueeze(0)).abs() > n_ec
                    yield q, items, keep

        m = torch.full((N,), -math.inf)
        ssum = torch.zeros(N)
        for q, items, keep in blocks():
            lg = (H[q] @ table.weight[items].float().t()).masked_fill(~keep, -math.inf)
            bm = torch.maximum(m[q], lg.max(1).values)
            ok = torch.isfinite(bm)
            e = torch.where(ok.unsqueeze(1), torch.exp(lg - bm.unsqueeze(1)), torch.zeros_like(lg)).sum(1)
            ssum[q] = torch.where(ok, ssum[q] * torch.exp(m[q] - bm) + e, ssum[q])
            m[q] = bm
        t_rows = table.gather_replicated(T)
        pos = (H * t_rows).sum(1)
        M = coll.all_reduce(torch.maximum(m, pos), "max", table.group)  # pos is the same on every rank
        part = torch.where(torch.isfinite(m), ssum * torch.exp(m - M), torch.zeros_like(ssum))
        total = coll.all_reduce(part, "sum", table.group) + torch.exp(pos - M)
        lse = M + torch.log(total)
        loss = (lse - pos).mean()
        if not need_grad:
            return loss, None, None, None
        gH = torch.zeros_like(H)
        g_local = torch.zeros(table.n_local, d)
        for q, items, keep in blocks():
            rows = table.weight[items].float()
            p = torch.exp(H[q] @ rows.t() - lse[q].unsqueeze(1)).masked_fill_(~keep, 0.0).div_(N)
            gH.index_add_(0, q, p @ rows)
            g_local.index_add_(0, items, p.t() @ H[q])
        coll.all_reduce(gH, "sum", table.group)
        coef = ((1.0 - torch.exp(pos - lse)) / N).unsqueeze(1)
        gH -= coef * t_rows
        touched = (g_local != 0).any(1).nonzero().squeeze(1)
        return loss, gH, [(T, -coef * H)], [(touched, g_local[touched])]

    return _apply(hidden, table, targets, compute)


# ---------------------------------------------------------------------------------------------- ce_sampled
def dist_ce_sampled(hidden, table, targets, num_negatives=256, sampling="uniform", logq_correction=True):
    C = table.num_items

    def compute(H, T, table, need_grad):
        N = H.size(0)
        if sampling == "uniform":
            if num_negatives <= 0:
                raise ValueError(f"ce_sampled: num_negatives must be positive, got {num_negatives}")
            neg_ids = sample_uniform_negatives((N, int(num_negatives)), C, H.device)
        elif sampling == "in_batch":
            neg_ids = T.unsqueeze(0).expand(N, N)
        else:
            raise ValueError(f"ce_sampled: sampling must be 'uniform' or 'in_batch', got {sampling!r}")

        def fn(Hl, rows, loc):
            t_rows = rows[loc[:N]]
            pos = (Hl * t_rows).sum(-1, keepdim=True)
            if sampling == "uniform":
                neg = torch.einsum("nd,nkd->nk", Hl, rows[loc[N:].view_as(neg_ids)])
                if logq_correction:
                    neg = neg - math.log(num_negatives / C)
            else:
                neg = Hl @ t_rows.t()
                if logq_correction:
                    _, inv, counts = torch.unique(T, return_inverse=True, return_counts=True)
                    neg = neg - torch.log(counts[inv].to(neg.dtype)).unsqueeze(0)
            neg = neg.masked_fill(neg_ids == T.unsqueeze(1), -math.inf)
            return F.cross_entropy(torch.cat([pos, neg], 1), torch.zeros(N, dtype=torch.long))

        want = torch.cat([T, neg_ids.reshape(-1)]) if sampling == "uniform" else T
        return _on_rows(H, T, table, need_grad, want, fn)

    return _apply(hidden, table, targets, compute)


DISTRIBUTED_LOSSES: dict[str, Callable] = {"ce": dist_ce, "sce": dist_sce, "rece": dist_rece,
                                           "ce_sampled": dist_ce_sampled}
