"""RECE — Reduced Cross-Entropy (Gusak et al., 2024): CE over LSH-like bucket neighbourhoods, in chunks.

Per round, with no gradient: ``n_buckets`` random directions; each query's and each item's bucket is the
direction of largest inner product; queries and items are sorted by bucket id (stably) and cut into
``n_buckets`` equal chunks. With gradient: each query chunk is scored against its item chunk and
``n_extra_chunks`` neighbours on each side; over ``rounds`` rounds the candidates of a query are pooled,
duplicates corrected by ``-log(count)``, the positive masked among them and appended; CE, mean over queries.

``impl="cpp"`` (default) is the chunked-CE op (one chunk's logits at a time, the item projections streamed
over the catalog); ``impl="reference"`` is the paper's pure-PyTorch formulation. Given the same directions
both give the same loss and gradients.
"""
from __future__ import annotations

import math

import torch

from scalerec.losses.registry import register_loss
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


@register_loss(
    "rece",
    defaults={"n_buckets": None, "n_extra_chunks": 1, "rounds": 1, "impl": "cpp", "tile": 65536, "generator": None,
              "fused_update": None, "rows_per_pass": 1 << 18},
)
def rece_loss(hidden, table, targets, **params):
    """RECE: CE over the chunk neighbourhoods of LSH-like buckets; n_buckets = sqrt(4·min(N,C)·(1+2·n_ec))."""
    return rece(hidden, table, targets, **params)
