"""Full-ranking evaluation through a MIPS index, exact or approximate, with the index's recall against exact.

``evaluate_with_index(model, dataset, index="IVF1024,Flat", nprobe=16)`` scores each case's state against
the catalog through the index (history excluded, the target itself kept, as in ``evaluate``), and reports:

* the metrics of the index's top-``max(ks)`` list (HR/NDCG/MRR@k; a target outside the list counts as a
  miss, which for ``k <= max(ks)`` is the same as ranking it exactly);
* with ``compare_exact`` (default): the same metrics from ``ExactIndex`` (``exact/`` prefix) and
  ``recall@k`` — the share of the exact top-k the index returned — so the cost of approximation is visible;
* timings: index build, index search, exact search.

Memory is O(batch x tile) for the exact side and whatever the index holds for the approximate one; nothing is
``cases x C``.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch

from scalerec.data.batching import pad_left
from scalerec.eval.metrics import eval_cases, metrics_from_ranks
from scalerec.retrieval import ExactIndex, MipsIndex, make_index


def _ranks_in_list(ids: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """0-based position of each target in its top list, or the list length when absent."""
    hit = ids == targets.unsqueeze(1)
    pos = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(targets, ids.size(1)))
    return pos.cpu().numpy()


@torch.no_grad()
def evaluate_with_index(
    model,
    dataset_or_set,
    index: str | MipsIndex = "exact",
    split: str = "test",
    ks: Sequence[int] = (1, 5, 10, 20, 50),
    batch_size: int = 512,
    max_cases: int | None = None,
    compare_exact: bool = True,
    **index_params: Any,
) -> dict[str, Any]:
    """Metrics of the index's top-k lists (see module doc). ``index``: a spec for ``make_index``
    (``"exact"``, ``"bucket"`` or a FAISS factory string, with ``index_params`` such as ``nprobe``) or a built
    ``MipsIndex``."""
    evset, n = eval_cases(dataset_or_set, split, batch_size, max_cases)
    was_training = model.training
    model.eval()
    table = model.item_table.detach()
    C = table.size(0) - 1
    kmax = min(max(ks), C)
    t0 = time.perf_counter()
    if isinstance(index, MipsIndex):
        idx = index if index.is_built else index.build(table)
        name = type(index).__name__
    else:
        idx = make_index(index, table, **index_params)
        name = str(index)
    build_s = time.perf_counter() - t0
    exact = ExactIndex(table) if compare_exact else None
    ranks, exact_ranks, search_s, exact_s = [], [], 0.0, 0.0
    hits = {k: 0 for k in ks}
    for s in range(0, n, batch_size):
        hist = evset.inputs[s : min(n, s + batch_size)]
        seqs = torch.from_numpy(pad_left(hist, model.maxlen)).to(table.device)
        q = model.last_hidden(seqs)
        tgt = torch.from_numpy(np.asarray(evset.targets[s : s + len(hist)], np.int64)).to(table.device)
        # the history is excluded, except the target itself (repeat consumption)
        excl = [h[h != t] for h, t in zip(hist, evset.targets[s : s + len(hist)])]
        t1 = time.perf_counter()
        _, ids = idx.search(q, kmax, exclude=excl)
        search_s += time.perf_counter() - t1
        ranks.append(_ranks_in_list(ids.to(tgt.device), tgt))
        if exact is not None:
            t1 = time.perf_counter()
            _, ex_ids = exact.search(q, kmax, exclude=excl)
            exact_s += time.perf_counter() - t1
            exact_ranks.append(_ranks_in_list(ex_ids, tgt))
            ids = ids.to(ex_ids.device)
            for k in ks:
                kk = min(k, kmax)
                a, e = ids[:, :kk], ex_ids[:, :kk]
                hits[k] += int(((a.unsqueeze(2) == e.unsqueeze(1)) & (e.unsqueeze(1) > 0)).any(2).sum())
    if was_training:
        model.train()
    out: dict[str, Any] = metrics_from_ranks(np.concatenate(ranks), ks)
    out.update({"index": name, "cases": n, "index_build_seconds": round(build_s, 4),
                "index_search_seconds": round(search_s, 4)})
    if exact is not None:
        for key, v in metrics_from_ranks(np.concatenate(exact_ranks), ks).items():
            out[f"exact/{key}"] = v
        for k in ks:
            out[f"recall@{k}"] = hits[k] / (n * min(k, kmax))
        out["exact_search_seconds"] = round(exact_s, 4)
    return out
