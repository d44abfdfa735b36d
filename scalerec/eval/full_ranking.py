"""Full-ranking evaluation over an item table: a local dense one or a row-sharded one over W ranks.

The rule is the one of ``scalerec.eval.metrics``: each case's state is scored against every item 1..C; items
of the history are excluded (the target itself stays rankable); the target's rank is the number of items
scoring strictly above it; COV@k is the share of the catalog in at least one top-k list.

With a ``ShardedItemTable`` each rank encodes its slice of every batch of cases, the states are all-gathered,
every rank scores all of them against its own rows tile by tile (history items it owns masked), one
all-reduce of the counts gives the ranks, and the ranks' top-k candidates are merged for the coverage. With a
``DenseItemTable`` (W = 1, no process group) the same code scores the whole table. Memory per rank:
O(batch x tile) scores, never batch x C.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from scalerec.data.batching import pad_left
from scalerec.data.dataset import EvalSet
from scalerec.dist import collectives as coll
from scalerec.eval.metrics import eval_cases, metrics_from_ranks
from scalerec.models.tables import DenseItemTable

EVAL_TILE = 65536


@torch.no_grad()
def _rank_batch(Q, tgt, hists, table, kmax: int, tile: int):
    """Local counts of items beating each target and the local top-``kmax`` (scores, global ids)."""
    B = Q.size(0)
    t_s = (Q * table.gather_replicated(tgt)).sum(1)
    rows = np.repeat(np.arange(B), [len(h) for h in hists])
    cols = np.concatenate(hists).astype(np.int64) if B else np.zeros(0, np.int64)
    keep = (cols != tgt.numpy()[rows]) & (cols > 0)
    ex_r, ex_c = torch.from_numpy(rows[keep]), torch.from_numpy(cols[keep])
    mine = table.owned(ex_c)
    ex_r, ex_l = ex_r[mine], table.layout.local_index(ex_c[mine])  # history items this rank owns, as local rows
    tgt_own = table.owned(tgt)
    tgt_l = torch.full_like(tgt, -1)
    tgt_l[tgt_own] = table.layout.local_index(tgt[tgt_own])
    cnt = torch.zeros(B, dtype=torch.long)
    k = min(kmax, table.num_items)
    best_s = torch.full((B, 0), -math.inf, dtype=Q.dtype)
    best_i = torch.zeros((B, 0), dtype=torch.long)
    for lo, hi, rows_t in table.tiles(tile):
        s = Q @ rows_t.t()
        sel = (ex_l >= lo) & (ex_l < hi)
        s[ex_r[sel], ex_l[sel] - lo] = -math.inf
        beats = s > t_s.unsqueeze(1)
        # the target never beats itself (its tiled score may round above the separately computed one)
        own = (tgt_l >= lo) & (tgt_l < hi)
        beats[own.nonzero(as_tuple=True)[0], tgt_l[own] - lo] = False
        cnt += beats.sum(1)
        cand_s = torch.cat([best_s, s], 1)
        cand_i = torch.cat([best_i, table.local_ids(lo, hi).expand(B, -1)], 1)
        best_s, pos = cand_s.topk(min(k, cand_s.size(1)), dim=1)
        best_i = cand_i.gather(1, pos)
    return cnt, best_s, best_i


def rank_and_topk(queries: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, histories: list[np.ndarray],
                  topk: int, tile: int = EVAL_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of each target among items 1..C of a dense ``table [C+1, d]`` (history excluded) and the
    top-``topk`` ids (``[B, min(topk, C)]``)."""
    cnt, _, best_i = _rank_batch(queries, targets, histories, DenseItemTable(table), topk, tile)
    return cnt, best_i


def _merge_topk(best_s, best_i, k: int, group):
    """The global top-``k`` ids per case from every rank's local top-k (one all-gather of each)."""
    if coll.world_size(group) == 1:
        return best_i
    B = best_s.size(0)
    pad = k - best_s.size(1)  # a shard with fewer than k rows
    s = torch.cat([best_s, torch.full((B, pad), -math.inf, dtype=best_s.dtype)], 1)
    i = torch.cat([best_i, torch.zeros((B, pad), dtype=torch.long)], 1)
    W = coll.world_size(group)
    S, _ = coll.all_gather_varlen(s.t().contiguous(), group, sizes=[k] * W)
    I, _ = coll.all_gather_varlen(i.t().contiguous(), group, sizes=[k] * W)
    S, I = S.t(), I.t()
    return I.gather(1, S.topk(k, dim=1).indices)


@torch.no_grad()
def evaluate_table(encode_last: Callable[[torch.Tensor], torch.Tensor], table, evset: EvalSet, ks: Sequence[int],
                   batch_size: int, maxlen: int, progress: bool = False, tile: int = EVAL_TILE) -> dict:
    """HR/NDCG/MRR/COV@k of the states ``encode_last(seqs [b, L]) -> [b, d]`` against ``table``.

    Collective when ``table`` is row-sharded: every rank calls it with the same ``evset``."""
    if batch_size <= 0:
        raise ValueError(f"eval.batch_size must be positive, got {batch_size}")
    if len(evset) == 0:
        raise ValueError("no cases to evaluate")
    W, r, group = table.world_size, table.rank, table.group
    kmax = max(ks)
    k = min(kmax, table.num_items)
    ranks, tops = [], []
    it = range(0, len(evset), batch_size)
    if progress and r == 0:
        from tqdm import tqdm

        it = tqdm(it, desc="eval", unit="batch", leave=False)
    for s in it:
        hist = evset.inputs[s : s + batch_size]
        mine = hist[r::W]
        # every rank runs the encoder once per batch (a sharded engine needs each rank in every forward)
        seqs = torch.from_numpy(pad_left(mine if mine else [np.zeros(1, np.int64)], maxlen))
        q = encode_last(seqs).to(table.compute_dtype)[: len(mine)]
        Q, _ = coll.all_gather_varlen(q.contiguous(), group)
        order = np.concatenate([np.arange(len(hist))[j::W] for j in range(W)])
        tgt = torch.from_numpy(np.asarray(evset.targets[s : s + batch_size])[order]).long()
        cnt, best_s, best_i = _rank_batch(Q, tgt, [hist[j] for j in order], table, kmax, tile)
        coll.all_reduce(cnt, "sum", group)
        ranks.append(cnt.numpy())
        tops.append(_merge_topk(best_s, best_i, k, group))
    out = metrics_from_ranks(np.concatenate(ranks), ks)
    top = torch.cat(tops)
    for kk in ks:
        out[f"COV@{kk}"] = float(torch.unique(top[:, :kk]).numel()) / table.num_items
    out["cases"] = len(evset)
    return out


@torch.no_grad()
def evaluate(model, dataset_or_set, split: str = "test", ks: Sequence[int] = (1, 5, 10, 20, 50),
             batch_size: int = 512, max_cases: int | None = None, progress: bool = False) -> dict[str, float]:
    """Full-ranking metrics of ``model`` (anything with ``last_hidden(seqs)``, ``item_table`` and ``maxlen``)."""
    evset, n = eval_cases(dataset_or_set, split, batch_size, max_cases)
    if n < len(evset):
        evset = EvalSet(evset.users[:n], evset.inputs[:n], evset.targets[:n])
    was_training = model.training
    model.eval()
    try:
        return evaluate_table(model.last_hidden, DenseItemTable(model.item_table), evset, ks, batch_size,
                              model.maxlen, progress=progress)
    finally:
        if was_training:
            model.train()
