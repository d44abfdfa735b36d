"""SCE — Scalable Cross-Entropy (Mezentsev et al., 2024): CE over candidates found by random-bucket MIPS.

Per step, with no gradient: draw ``n_buckets`` random directions (or, with ``mix_x``, random mixes of the
query states); for each direction take the top ``bucket_size_x`` queries and the top ``bucket_size_y`` items
by inner product. With gradient: the logits of each bucket's queries against its items, the positive's logit
appended and the positive masked among the negatives, CE per (bucket, query), and per query the max over the
buckets it fell in; the loss is the mean over the queries that fell in at least one bucket.

``impl="cpp"`` (default) runs the streaming top-k op (the item side is scored one catalog tile at a time, so
``n_buckets × C`` is never held) and the bucketed-CE op (no ``[n_b, b_x, d]`` gathers);
``impl="reference"`` is the paper's pure-PyTorch formulation (materialises ``n_buckets × C`` scores and the
gathers). Given the same directions both give the same loss and gradients.

``sharded_sce`` is SCE over a row-sharded table: the directions come from the common random state (the same
on every rank); each rank streams its own shard through ``bucket_topk`` (a bfloat16 shard converted tile by
tile) and the ranks' per-bucket candidates are merged into the global top-``b_y``; then each rank runs the
bucketed CE of its own buckets only (bucket b on rank b mod W) on the candidate and positive rows fetched
from their owners. A query's loss is the max over its buckets (one all-reduce), and the rank holding the
winning bucket back-propagates it: no rank repeats another's work, and loss and gradients equal ``sce``'s.
"""
from __future__ import annotations

import math

import torch

from scalerec.dist import collectives as coll
from scalerec.losses.registry import register_loss, register_sharded
from scalerec.losses.sharded import eager_sharded_loss
from scalerec.ops.bucket_ce import bucket_ce, bucket_ce_reference
from scalerec.ops.bucket_topk import bucket_topk, bucket_topk_reference

_IMPLS = ("cpp", "reference")


def default_n_buckets(n_queries: int) -> int:
    """The SCE paper's default ``n_buckets = bucket_size_x = int(2 * sqrt(N))`` for N query rows."""
    return max(1, int(2 * math.sqrt(n_queries)))


def sce_directions(
    hidden: torch.Tensor, n_buckets: int, mix_x: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The ``[n_buckets, d]`` bucket directions: Gaussian, or Gaussian mixes of the query states (``mix_x``)."""
    N, d = hidden.shape
    scale = 1.0 / math.sqrt(math.sqrt(d))
    with torch.no_grad():
        if mix_x:
            omega = scale * torch.randn(N, n_buckets, generator=generator, dtype=hidden.dtype, device=hidden.device)
            return omega.t() @ hidden.detach()
        return scale * torch.randn(n_buckets, d, generator=generator, dtype=hidden.dtype, device=hidden.device)


def sce(
    hidden: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    n_buckets: int | None = None,
    bucket_size_x: int | None = None,
    bucket_size_y: int = 256,
    mix_x: bool = False,
    impl: str = "cpp",
    tile: int = 4096,
    generator: torch.Generator | None = None,
    directions: torch.Tensor | None = None,
    sparse_grad: bool = False,
) -> torch.Tensor:
    """SCE loss of ``hidden [N, d]`` against ``table [C+1, d]`` (row 0 = padding, never a candidate).

    ``directions`` (``[n_b, d]``) overrides the random draw (then ``n_buckets``/``mix_x``/``generator`` are
    unused); otherwise they are drawn with ``generator`` (or the global RNG).

    ``sparse_grad``: the table's gradient from this loss is a sparse COO tensor over the rows it touches (the
    targets and the candidates) instead of a dense ``[C+1, d]`` one — for huge catalogs trained with a
    row-sparse optimizer (``torch.optim.SparseAdam``); the values are the same.
    """
    if impl not in _IMPLS:
        raise ValueError(f"sce: impl must be one of {_IMPLS}, got {impl!r}")
    N, C = hidden.size(0), table.size(0) - 1
    if directions is None:
        n_b = default_n_buckets(N) if n_buckets is None else int(n_buckets)
        if n_b <= 0:
            raise ValueError(f"sce: n_buckets must be positive, got {n_buckets}")
        directions = sce_directions(hidden, n_b, mix_x=mix_x, generator=generator)
    elif directions.dim() != 2 or directions.size(1) != hidden.size(1):
        raise ValueError(f"sce: directions must be [n_buckets, d={hidden.size(1)}], got {tuple(directions.shape)}")
    directions = directions.detach().to(hidden.dtype)
    b_x = default_n_buckets(N) if bucket_size_x is None else int(bucket_size_x)
    b_y = int(bucket_size_y)
    if b_x <= 0 or b_y <= 0:
        raise ValueError(f"sce: bucket_size_x and bucket_size_y must be positive, got {b_x} and {b_y}")
    b_x, b_y = min(b_x, N), min(b_y, C)
    topk, ce = (bucket_topk, bucket_ce) if impl == "cpp" else (bucket_topk_reference, bucket_ce_reference)
    kw = {"tile": tile} if impl == "cpp" else {}
    _, x_ids = topk(directions, hidden.detach(), b_x, row_start=0, **kw)
    _, y_ids = topk(directions, table.detach(), b_y, row_start=1, **kw)
    if sparse_grad:
        table, targets, y_ids = compact_rows(table, targets, y_ids)
    loss, covered = ce(hidden, table, targets, x_ids, y_ids)
    return loss[covered].mean()


def compact_rows(table: torch.Tensor, targets: torch.Tensor, y_ids: torch.Tensor):
    """The rows of ``targets`` and ``y_ids`` as a compact table (row 0 = padding) read through a sparse
    embedding lookup, so the gradient reaching ``table`` is a sparse COO tensor over those rows; returns
    ``(compact table, targets, y_ids)`` renumbered into it (a bijection: masking by id equality is unchanged)."""
    ids, inv = torch.unique(torch.cat([targets, y_ids.reshape(-1)]), return_inverse=True)
    rows = torch.nn.functional.embedding(ids, table, sparse=True)
    compact = torch.cat([rows.new_zeros(1, rows.size(1)), rows])
    n = targets.numel()
    return compact, inv[:n] + 1, (inv[n:] + 1).view_as(y_ids)


@register_loss("sce")
def sce_loss(hidden, table, targets, n_buckets=None, bucket_size_x=None, bucket_size_y=256, mix_x=False, impl="cpp",
             tile=4096, generator=None, sparse_grad=False):
    """SCE: CE over random-bucket MIPS candidates. ``n_buckets``/``bucket_size_x`` default to int(2·sqrt(N))."""
    return sce(hidden, table, targets, n_buckets=n_buckets, bucket_size_x=bucket_size_x, bucket_size_y=bucket_size_y,
               mix_x=mix_x, impl=impl, tile=tile, generator=generator, sparse_grad=sparse_grad)


def local_bucket_topk(table, directions: torch.Tensor, k: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's top-``k`` rows per direction ``(scores, global ids)``, streamed over its shard by the op."""
    k = min(k, table.n_local)
    if k == 0:
        return directions.new_zeros(directions.size(0), 0), torch.zeros(directions.size(0), 0, dtype=torch.long)
    s, i = bucket_topk(directions, table.weight, k, row_start=0, tile=tile)
    return s, table.global_ids(i)


def global_bucket_topk(table, directions: torch.Tensor, k: int, tile: int) -> torch.Tensor:
    """The global top-``k`` item ids per direction ``[n_b, k]``: every rank's local top-k, merged (one all-gather)."""
    s, i = local_bucket_topk(table, directions, k, tile)
    if table.world_size > 1:
        n_b, pad = directions.size(0), k - s.size(1)  # a shard smaller than k
        s = torch.cat([s, torch.full((n_b, pad), -math.inf, dtype=s.dtype)], 1)
        i = torch.cat([i, torch.zeros((n_b, pad), dtype=torch.long)], 1)
        same = [k] * table.world_size  # every rank sends k candidates per bucket: no size exchange
        S, _ = coll.all_gather_varlen(s.t().contiguous(), table.group, sizes=same)  # [W * k, n_b]
        I, _ = coll.all_gather_varlen(i.t().contiguous(), table.group, sizes=same)
        s, i = S.t(), I.t()
    # ties broken by the smaller id, as bucket_topk does on one table
    order = torch.sort(i, dim=1, stable=True).indices
    s, i = s.gather(1, order), i.gather(1, order)
    return i.gather(1, torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k])


@register_sharded("sce")
def sharded_sce(hidden, table, targets, n_buckets=None, bucket_size_x=None, bucket_size_y=256, mix_x=False,
                impl="cpp", tile=4096, generator=None, sparse_grad=False):
    """SCE over a row-sharded table (see the module docstring). ``sparse_grad`` has no effect here: the sharded
    table always receives the gradients of the touched rows only."""
    if impl not in _IMPLS:
        raise ValueError(f"sce: impl must be one of {_IMPLS}, got {impl!r}")

    def compute(H, T, table, need_grad):
        N, C, W, r = H.size(0), table.num_items, table.world_size, table.rank
        n_b = default_n_buckets(N) if n_buckets is None else int(n_buckets)
        b_x = default_n_buckets(N) if bucket_size_x is None else int(bucket_size_x)
        b_y = int(bucket_size_y)
        if n_b <= 0 or b_x <= 0 or b_y <= 0:
            raise ValueError(f"sce: n_buckets, bucket_size_x and bucket_size_y must be positive, got "
                             f"{n_b}, {b_x} and {b_y}")
        b_x, b_y = min(b_x, N), min(b_y, C)
        directions = sce_directions(H, n_b, mix_x=bool(mix_x), generator=generator)
        y_ids = global_bucket_topk(table, directions, b_y, int(tile))
        if impl == "cpp":
            _, x_ids = bucket_topk(directions, H, b_x, row_start=0, tile=int(tile))
        else:
            _, x_ids = bucket_topk_reference(directions, H, b_x, row_start=0)
        mine = torch.arange(r, n_b, W)  # this rank's buckets
        xm, ym = x_ids[mine], y_ids[mine]
        q = torch.unique(xm)
        ids, loc = torch.unique(torch.cat([T[q], ym.reshape(-1)]), return_inverse=True)
        rows, handle = table.fetch(ids)
        t_c = torch.zeros(N, dtype=torch.long)
        t_c[q] = loc[: q.numel()] + 1  # row 0 of the compact table: padding
        y_c = (loc[q.numel():] + 1).view_as(ym)
        ce = bucket_ce if impl == "cpp" else bucket_ce_reference
        with torch.enable_grad():
            Hl, Rl = H.clone().requires_grad_(need_grad), rows.requires_grad_(need_grad)
            loss_r, cov_r = ce(Hl, torch.cat([Rl.new_zeros(1, Rl.size(1)), Rl]), t_c, xm, y_c)
        mine_l = loss_r.detach().masked_fill(~cov_r, -math.inf)
        L = coll.all_reduce(mine_l.clone(), "max", table.group)
        covered = torch.isfinite(L)
        # the lowest rank whose bucket gives the max back-propagates it
        cand = torch.where(cov_r & (mine_l == L), -r, -W).long()
        winner = -coll.all_reduce(cand, "max", table.group)
        loss = L[covered].mean()
        if not need_grad:
            return loss, None, None, None
        w = ((winner == r) & covered).to(H.dtype) / covered.sum()
        with torch.enable_grad():
            gH, gR = torch.autograd.grad((loss_r * w).sum(), [Hl, Rl], allow_unused=True)
        gH = torch.zeros_like(H) if gH is None else gH
        gR = torch.zeros_like(rows) if gR is None else gR
        coll.all_reduce(gH, "sum", table.group)
        return loss, gH, None, [table.send_grads(handle, gR)]

    return eager_sharded_loss(hidden, table, targets, compute)
