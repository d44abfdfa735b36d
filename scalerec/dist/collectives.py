"""Collective helpers for the row-sharded item table and the distributed losses.

Every helper works with ``group=None`` and no initialised process group as the single-process case (W = 1),
so the same code path serves one process and W workers. Only collectives that gloo implements are used:
``all_reduce``, ``all_gather`` (equal sizes, padded here for ragged inputs) and ``all_to_all_single``
(gloo has no list ``all_to_all``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce (``op`` is ``sum`` or ``max``); returns ``t`` for chaining."""
    if is_distributed(group):
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=group)
    return t


def all_gather_sizes(n: int, group=None) -> list[int]:
    if not is_distributed(group):
        return [int(n)]
    t = torch.tensor([int(n)], dtype=torch.long)
    out = [torch.zeros_like(t) for _ in range(world_size(group))]
    dist.all_gather(out, t, group=group)
    return [int(x) for x in out]


def all_gather_varlen(t: torch.Tensor, group=None, sizes: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's ``t`` (any first-dim length) in rank order; returns ``(cat, sizes)``."""
    if not is_distributed(group):
        return t, [t.size(0)]
    sizes = list(sizes) if sizes is not None else all_gather_sizes(t.size(0), group)
    m = max(sizes)
    padded = t.new_zeros((m,) + tuple(t.shape[1:]))
    padded[: t.size(0)] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous(), group=group)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]), sizes


def exchange(send: torch.Tensor, send_counts: Sequence[int], group=None,
             recv_counts: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """All-to-all of rows: ``send`` holds, in rank order, ``send_counts[r]`` rows for rank r.

    Returns the rows received (in source-rank order) and how many came from each rank. Uses
    ``all_to_all_single`` with split sizes (gloo supports it; it has no list all-to-all).
    """
    send_counts = [int(c) for c in send_counts]
    if not is_distributed(group):
        return send, send_counts
    if recv_counts is None:
        sc = torch.tensor(send_counts, dtype=torch.long)
        rc = torch.empty_like(sc)
        dist.all_to_all_single(rc, sc, group=group)
        recv_counts = rc.tolist()
    recv_counts = [int(c) for c in recv_counts]
    out = send.new_empty((sum(recv_counts),) + tuple(send.shape[1:]))
    dist.all_to_all_single(out, send.contiguous(), output_split_sizes=recv_counts,
                           input_split_sizes=send_counts, group=group)
    return out, recv_counts


def broadcast_object(obj, src: int = 0, group=None):
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
