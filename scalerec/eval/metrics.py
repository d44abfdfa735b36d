"""Ranking metrics from 0-based target ranks (the evaluation itself: ``scalerec.eval.full_ranking``).

Metrics for every k: HR@k, NDCG@k = 1/log2(rank+2), MRR@k = 1/(rank+1) (0 when rank >= k), and
COV@k = share of the catalog that appears in at least one top-k list.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

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


def eval_cases(dataset_or_set, split: str, batch_size: int, max_cases: int | None) -> tuple[EvalSet, int]:
    """The evaluation set of ``split`` (or the given ``EvalSet``) and how many of its cases to score."""
    evset: EvalSet = dataset_or_set.eval_set(split) if hasattr(dataset_or_set, "eval_set") else dataset_or_set
    if batch_size <= 0:
        raise ValueError(f"eval.batch_size must be positive, got {batch_size}")
    n = len(evset) if max_cases is None else min(len(evset), max_cases)
    if n == 0:
        raise ValueError(f"no {split} cases to evaluate")
    return evset, n
