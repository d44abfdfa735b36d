"""MIPS indexes over an item table ``[C + 1, d]`` (row 0 = padding), one interface (``MipsIndex``):

``build(item_table)``, ``search(queries, k, exclude=None) -> (scores, ids)``, ``refresh(item_table)``.

* ``ExactIndex``: exact, tiled matmul + running top-k in torch (never ``N x C`` at once).
* ``FaissIndex``: any FAISS factory string with the inner-product metric (Flat, IVF, IVF-PQ, HNSW), CPU or GPU.
* ``BucketIndex``: SCE's random-bucket search.

``make_index(spec, **params)`` builds one from a string: ``"exact"``, ``"bucket"`` or a FAISS factory string.
"""
from __future__ import annotations

from typing import Any

from scalerec.retrieval.base import MipsIndex, normalize_exclude
from scalerec.retrieval.bucket import BucketIndex
from scalerec.retrieval.exact import ExactIndex, brute_force_topk
from scalerec.retrieval.faiss_index import FaissIndex, faiss_has_gpu


def make_index(spec: str, item_table=None, **params: Any) -> MipsIndex:
    """``"exact"`` -> ExactIndex, ``"bucket"`` -> BucketIndex, anything else -> FaissIndex(spec)."""
    key = spec.strip().lower() if isinstance(spec, str) else spec
    if key == "exact":
        return ExactIndex(item_table, **params)
    if key == "bucket":
        return BucketIndex(item_table, **params)
    return FaissIndex(spec, item_table, **params)


__all__ = [
    "BucketIndex",
    "ExactIndex",
    "FaissIndex",
    "MipsIndex",
    "brute_force_topk",
    "faiss_has_gpu",
    "make_index",
    "normalize_exclude",
]
