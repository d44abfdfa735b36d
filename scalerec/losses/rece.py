"""RECE — Reduced Cross-Entropy (Gusak et al., 2024): CE over LSH-like bucket neighbourhoods, in chunks.

Per round, with no gradient: ``n_buckets`` random directions; each query's and each item's bucket is the
direction of largest inner product; queries and items are sorted by bucket id (stably) and cut into
``n_buckets`` equal chunks. With gradient: each query chunk is scored against its item chunk and
``n_extra_chunks`` neighbours on each side; over ``rounds`` rounds the candidates of a query are pooled,
duplicates corrected by ``-log(count)``, the positive masked among them and appended; CE, mean over queries.

``impl="cpp"`` (default) is the chunked-CE op (one chunk's logits at a time, the item projections streamed
over the catalog); ``impl="reference"`` is the paper's pure-PyTorch formulation. Given the same directions
both give the same loss and gradients.

``sharded_rece`` is RECE over a row-sharded table. The queries are all-gathered and chunked identically on
every rank. The item chunks need every item's bucket: each rank assigns its own rows (``bucket_argmax`` over
its shard), one all-reduce of a ``[C]`` int32 vector per round shares them, and every rank sorts them as
``rece`` does (bucket, then id), so the chunks are the single-process ones on every layout. Each rank then
scores every query chunk against the rows it owns in that chunk's neighbourhood (a duplicate across rounds
counts once, as the -log(count) correction does) and the per-query partial (max, sum-exp) is all-reduced.
"""
from __future__ import annotations

import math

import torch

from scalerec.dist import collectives as coll
from scalerec.losses.registry import register_loss, register_sharded
from scalerec.losses.sharded import eager_sharded_loss
from scalerec.ops.chunk_ce import bucket_argmax, chunk_ce, chunk_ce_fused, chunk_ce_reference

_IMPLS = ("cpp", "reference")


def default_n_buckets(n_queries: int, n_items: int, n_extra_chunks: int) -> int:
    """The RECE paper's ``n_buckets = sqrt(4 · min(N, C) · (1 + 2 · n_extra_chunks))``, at most min(N, C)."""
    m = min(n_queries, n_items)
    return max(1, min(m, int(math.sqrt(4 * m * (1 + 2 * n_extra_chunks)))))


def rece_chunks(
    hidden: torch.Tensor, table: torch.Tensor, directions: torch.Tensor, tile: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_chunks [R, K, cx], y_chunks [R, K, cy])`` for ``directions [R, K, d]`` (table row 0 = padding)."""
    R, K, _ = directions.shape
    N, C = hidden.size(0), table.size(0) - 1
    cx, cy = math.ceil(N / K), math.ceil(C / K)
    x_chunks = torch.full((R, K * cx), -1, dtype=torch.long, device=hidden.device)
    y_chunks = torch.full((R, K * cy), -1, dtype=torch.long, device=hidden.device)
    with torch.no_grad():
        for r in range(R):
            q_bucket = (hidden.detach() @ directions[r].t()).argmax(dim=1)
            i_bucket = bucket_argmax(directions[r], table.detach(), row_start=1, tile=tile)
            x_chunks[r, :N] = torch.sort(q_bucket, stable=True).indices
            y_chunks[r, :C] = torch.sort(i_bucket, stable=True).indices + 1
    return x_chunks.view(R, K, cx), y_chunks.view(R, K, cy)


def rece(
    hidden: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    n_buckets: int | None = None,
    n_extra_chunks: int = 1,
    rounds: int = 1,
    impl: str = "cpp",
    tile: int = 65536,
    generator: torch.Generator | None = None,
    directions: torch.Tensor | None = None,
    fused_update=None,
    rows_per_pass: int = 1 << 18,
) -> torch.Tensor:
    """RECE loss of ``hidden [N, d]`` against ``table [C+1, d]`` (row 0 = padding, never a candidate).

    ``directions`` (``[rounds, n_buckets, d]``) overrides the random draw made with ``generator``.

    ``fused_update`` (e.g. ``scalerec.ops.row_update.RowwiseAdagrad(C + 1, lr)``): the backward updates the
    table in place, ``rows_per_pass`` rows at a time, and gives it no gradient — RECE's exact table gradient
    is dense (every item sits in some chunk), so for 10^7+ items this is how it stays within a few hundred MB
    beyond the table (``benchmarks/loss_memory.py``, ``rece_cpp_fused``). C++ path, CPU only.
    """
    if impl not in _IMPLS:
        raise ValueError(f"rece: impl must be one of {_IMPLS}, got {impl!r}")
    if n_extra_chunks < 0:
        raise ValueError(f"rece: n_extra_chunks must be >= 0, got {n_extra_chunks}")
    N, C, d = hidden.size(0), table.size(0) - 1, hidden.size(1)
    if directions is None:
        if rounds <= 0:
            raise ValueError(f"rece: rounds must be positive, got {rounds}")
        n_b = default_n_buckets(N, C, n_extra_chunks) if n_buckets is None else int(n_buckets)
        if n_b <= 0:
            raise ValueError(f"rece: n_buckets must be positive, got {n_buckets}")
        directions = torch.randn(rounds, n_b, d, generator=generator, dtype=hidden.dtype, device=hidden.device)
    elif directions.dim() != 3 or directions.size(2) != d:
        raise ValueError(f"rece: directions must be [rounds, n_buckets, d={d}], got {tuple(directions.shape)}")
    x_chunks, y_chunks = rece_chunks(hidden, table, directions.detach().to(hidden.dtype), tile=tile)
    if fused_update is not None:
        if impl != "cpp":
            raise ValueError("rece: fused_update needs impl='cpp'")
        return chunk_ce_fused(hidden, table, targets, x_chunks, y_chunks, int(n_extra_chunks), fused_update,
                              rows_per_pass).mean()
    fn = chunk_ce if impl == "cpp" else chunk_ce_reference
    return fn(hidden, table, targets, x_chunks, y_chunks, int(n_extra_chunks)).mean()


@register_loss("rece")
def rece_loss(hidden, table, targets, n_buckets=None, n_extra_chunks=1, rounds=1, impl="cpp", tile=65536,
              generator=None, fused_update=None, rows_per_pass=1 << 18):
    """RECE: CE over the chunk neighbourhoods of LSH-like buckets; n_buckets = sqrt(4·min(N,C)·(1+2·n_ec))."""
    return rece(hidden, table, targets, n_buckets=n_buckets, n_extra_chunks=n_extra_chunks, rounds=rounds,
                impl=impl, tile=tile, generator=generator, fused_update=fused_update, rows_per_pass=rows_per_pass)


_SCAN_ROWS = 1 << 18  # shard rows scored at a time when assigning buckets


def _item_chunks(table, directions_r: torch.Tensor, cy: int, tile: int) -> torch.Tensor:
    """Chunk id of each local row for one round: the items sorted stably by bucket (then id), cut every ``cy``.

    Every item's bucket is shared (one all-reduce of a [C] int32 vector), so the order and the chunks are the
    single-process ones whatever the layout."""
    buckets = torch.zeros(table.num_items, dtype=torch.int32)
    ids = table.local_ids()
    for a, b, rows in table.tiles(_SCAN_ROWS):
        buckets[ids[a:b] - 1] = bucket_argmax(directions_r, rows, row_start=0, tile=tile).to(torch.int32)
    coll.all_reduce(buckets, "sum", table.group)
    pos = torch.empty(table.num_items, dtype=torch.long)
    pos[torch.sort(buckets, stable=True).indices] = torch.arange(table.num_items)
    return pos[ids - 1] // cy


@register_sharded("rece")
def sharded_rece(hidden, table, targets, n_buckets=None, n_extra_chunks=1, rounds=1, impl="cpp", tile=65536,
                 generator=None, fused_update=None, rows_per_pass=1 << 18):
    """RECE over a row-sharded table (see the module docstring); equal to ``rece`` on every layout."""
    if impl not in _IMPLS:
        raise ValueError(f"rece: impl must be one of {_IMPLS}, got {impl!r}")
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

        m = torch.full((N,), -math.inf, dtype=H.dtype)
        ssum = torch.zeros(N, dtype=H.dtype)
        for q, items, keep in blocks():
            lg = (H[q] @ table.weight[items].to(H.dtype).t()).masked_fill(~keep, -math.inf)
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
        g_local = torch.zeros(table.n_local, d, dtype=H.dtype)
        for q, items, keep in blocks():
            rows = table.weight[items].to(H.dtype)
            p = torch.exp(H[q] @ rows.t() - lse[q].unsqueeze(1)).masked_fill_(~keep, 0.0).div_(N)
            gH.index_add_(0, q, p @ rows)
            g_local.index_add_(0, items, p.t() @ H[q])
        coll.all_reduce(gH, "sum", table.group)
        coef = ((1.0 - torch.exp(pos - lse)) / N).unsqueeze(1)
        gH -= coef * t_rows
        touched = (g_local != 0).any(1).nonzero().squeeze(1)
        return loss, gH, [(T, -coef * H)], [(touched, g_local[touched])]

    return eager_sharded_loss(hidden, table, targets, compute)
