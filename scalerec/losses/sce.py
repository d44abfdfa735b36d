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
"""
from __future__ import annotations

import math

import torch

from scalerec.losses.registry import register_loss
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
    tile: int = 8192,
    generator: torch.Generator | None = None,
    directions: torch.Tensor | None = None,
) -> torch.Tensor:
    """SCE loss of ``hidden [N, d]`` against ``table [C+1, d]`` (row 0 = padding, never a candidate).

    ``directions`` (``[n_b, d]``) overrides the random draw (then ``n_buckets``/``mix_x``/``generator`` are
    unused); otherwise they are drawn with ``generator`` (or the global RNG).
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
    if impl == "cpp":
        _, x_ids = bucket_topk(directions, hidden.detach(), b_x, row_start=0, tile=tile)
        _, y_ids = bucket_topk(directions, table.detach(), b_y, row_start=1, tile=tile)
        loss, covered = bucket_ce(hidden, table, targets, x_ids, y_ids)
    else:
        _, x_ids = bucket_topk_reference(directions, hidden.detach(), b_x, row_start=0)
        _, y_ids = bucket_topk_reference(directions, table.detach(), b_y, row_start=1)
        loss, covered = bucket_ce_reference(hidden, table, targets, x_ids, y_ids)
    return loss[covered].mean()


@register_loss(
    "sce",
    defaults={
        "n_buckets": None,
        "bucket_size_x": None,
        "bucket_size_y": 256,
        "mix_x": False,
        "impl": "cpp",
        "tile": 8192,
        "generator": None,
    },
)
def sce_loss(hidden, table, targets, **params):
    """SCE: CE over random-bucket MIPS candidates. ``n_buckets``/``bucket_size_x`` default to int(2·sqrt(N))."""
    return sce(hidden, table, targets, **params)
