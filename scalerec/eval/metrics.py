"""Full-ranking evaluation over the whole catalog.

For each case the model's state after the user's history is scored against every item; items already in
the history are excluded (except the target itself, for datasets with repeat consumption). The rank of the
target is counted tile by tile over the catalog, and a running top-k gives the coverage, so memory is
O(users_batch · tile) regardless of catalog size.

Metrics for every k: HR@k, NDCG@k = 1/log2(rank+2), MRR@k = 1/(rank+1) (0 when rank >= k), and
COV@k = share of the catalog that appears in at least one top-k list.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from scalerec.data.batching import pad_left
from scalerec.data.dataset import EvalSet


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """HR/NDCG/MRR@k from 0-based ranks of the targets."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) if len(ranks) else 0.0
        out[f"MRR@{k}"] = float(np.where(hit, 1.0 / (ranks + 1.0), 0.0).mean()) if len(ranks) else 0.0
    return out


@torch.no_grad()
def rank_and_topk(
    queries: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    histories: list[np.ndarray],
    topk: int,
    tile: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of each target among items 1..C (history excluded) and the top-``topk`` ids.

    ``queries [B, d]``, ``table [C+1, d]`` (row 0 padding, never ranked), ``targets [B]``.
    """
    B = queries.size(0)
    C1 = table.size(0)
    target_scores = (queries * table[targets]).sum(-1)
    # (row, item) pairs to exclude: the history, minus the target itself
    rows = np.repeat(np.arange(B), [len(h) for h in histories])
    cols = np.concatenate(histories) if B else np.zeros(0, np.int64)
    keep = cols != targets.cpu().numpy()[rows]
    ex_rows = torch.from_numpy(rows[keep]).to(queries.device)
    ex_cols = torch.from_numpy(cols[keep].astype(np.int64)).to(queries.device)
    ranks = torch.zeros(B, dtype=torch.long, device=queries.device)
    k = min(topk, C1 - 1)
    best_s = torch.full((B, k), -math.inf, device=queries.device, dtype=queries.dtype)
    best_i = torch.zeros((B, k), dtype=torch.long, device=queries.device)
    for lo in range(1, C1, tile):
        hi = min(C1, lo + tile)
        s = queries @ table[lo:hi].t()
        sel = (ex_cols >= lo) & (ex_cols < hi)
        s[ex_rows[sel], ex_cols[sel] - lo] = -math.inf
        beats = s > target_scores[:, None]
        # the target never beats itself (its tiled score may round above the separately computed one)
        own = (targets >= lo) & (targets < hi)
        beats[own.nonzero(as_tuple=True)[0], targets[own] - lo] = False
        ranks += beats.sum(1)
        cand_s = torch.cat([best_s, s], 1)
        cand_i = torch.cat([best_i, torch.arange(lo, hi, device=s.device).expand(B, -1)], 1)
        best_s, pos = cand_s.topk(k, dim=1)
        best_i = cand_i.gather(1, pos)
    return ranks, best_i


def eval_cases(dataset_or_set, split: str, batch_size: int, max_cases: int | None) -> tuple[EvalSet, int]:
    """The evaluation set of ``split`` (or the given ``EvalSet``) and how many of its cases to score."""
    evset: EvalSet = dataset_or_set.eval_set(split) if hasattr(dataset_or_set, "eval_set") else dataset_or_set
    if batch_size <= 0:
        raise ValueError(f"eval.batch_size must be positive, got {batch_size}")
    n = len(evset) if max_cases is None else min(len(evset), max_cases)
    if n == 0:
        raise ValueError(f"no {split} cases to evaluate")
    return evset, n


@torch.no_grad()
def evaluate(
    model,
    dataset_or_set,
    split: str = "test",
    ks: Sequence[int] = (1, 5, 10, 20, 50),
    batch_size: int = 512,
    max_cases: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Full-ranking metrics of ``model`` (anything with ``last_hidden(seqs)`` and ``item_table``)."""
    evset, n = eval_cases(dataset_or_set, split, batch_size, max_cases)
    was_training = model.training
    model.eval()
    table = model.item_table.detach()
    kmax = max(ks)
    num_items = table.size(0) - 1
    covered = {k: torch.zeros(table.size(0), dtype=torch.bool) for k in ks}
    ranks = []
    it = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"eval {split}", unit="batch", leave=False)
    for s in it:
        hist = evset.inputs[s : min(n, s + batch_size)]
        seqs = torch.from_numpy(pad_left(hist, model.maxlen)).to(table.device)
        q = model.last_hidden(seqs)
        tgt = torch.from_numpy(evset.targets[s : s + len(hist)]).to(table.device)
        r, top = rank_and_topk(q, table, tgt, hist, kmax)
        ranks.append(r.cpu().numpy())
        top = top.cpu()
        for k in ks:
            covered[k][top[:, :k].reshape(-1)] = True
    if was_training:
        model.train()
    out = metrics_from_ranks(np.concatenate(ranks), ks)
    for k in ks:
        out[f"COV@{k}"] = float(covered[k].sum().item()) / num_items
    out["cases"] = n
    return out
