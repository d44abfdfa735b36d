"""SCE with FAISS candidates (``sce_faiss``): CE over each query's hardest negatives found by a MIPS index.

Per step, with no gradient: the index (built over the item table) returns each query's top
``num_negatives`` items by inner product with the positive excluded; optionally ``num_uniform`` uniform
negatives are mixed in. With gradient: the logits of the positive and of those candidates (``gather_dot``,
no ``[N, K, d]`` gather), candidates equal to the positive or missing masked, CE with the positive first.

The table drifts as it trains, so the index is refreshed every ``refresh_every`` steps (``refresh``:
re-encode all rows, trained IVF/PQ structures kept; ``retrain_every`` > 0 also retrains them every that
many refreshes). Between refreshes the *selection* uses the stale index while the logits always use the
current table. Memory per step: O(N·K) for the candidates plus the index (for ``Flat``, a copy of the table;
``index: exact`` searches the live table in place with the tiled top-k, no copy and always fresh).

The index lives in a per-table state (keyed by the table tensor's identity, so the same loss object used on
the same ``nn.Embedding`` keeps its index across steps). ``stats()`` reports, per state: steps, refreshes,
seconds spent building/refreshing and searching — the refresh cost. With ``log_every`` > 0 the state also
prints its stats (one JSON object) to stderr every that many steps.

YAML::

    loss:
      name: sce_faiss
      params: {index: "IVF1024,Flat", nprobe: 16, num_negatives: 256, num_uniform: 64, refresh_every: 100}
      # index_params: {train_size: 100000}   # any other constructor argument of the index
"""
from __future__ import annotations

import json
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from scalerec.losses.registry import register_loss, sample_uniform_negatives
from scalerec.ops import gather_dot

@dataclass
class CandidateIndexState:
    """A MIPS index over one table, with its refresh schedule and timing."""

    spec: str
    index_params: dict
    refresh_every: int
    retrain_every: int = 0
    index: Any = None
    steps: int = 0
    builds: int = 0
    refreshes: int = 0
    build_seconds: float = 0.0
    refresh_seconds: float = 0.0
    search_seconds: float = 0.0
    last_refresh_step: int = 0
    table_ref: Any = field(default=None, repr=False)

    def maybe_refresh(self, table: torch.Tensor) -> None:
        from scalerec.retrieval import make_index

        t0 = time.perf_counter()
        if self.index is None:
            self.index = make_index(self.spec, table, **self.index_params)
            self.builds += 1
            self.build_seconds += time.perf_counter() - t0
            self.last_refresh_step = self.steps
            return
        if self.refresh_every > 0 and self.steps - self.last_refresh_step >= self.refresh_every:
            retrain = self.retrain_every > 0 and (self.refreshes + 1) % self.retrain_every == 0
            if retrain and hasattr(self.index, "factory"):
                self.index.refresh(table, retrain=True)
            else:
                self.index.refresh(table)
            self.refreshes += 1
            self.refresh_seconds += time.perf_counter() - t0
            self.last_refresh_step = self.steps

    def stats(self) -> dict:
        return {
            "index": self.spec,
            "steps": self.steps,
            "builds": self.builds,
            "refreshes": self.refreshes,
            "build_seconds": round(self.build_seconds, 6),
            "refresh_seconds": round(self.refresh_seconds, 6),
            "seconds_per_refresh": round(self.refresh_seconds / self.refreshes, 6) if self.refreshes else None,
            "search_seconds": round(self.search_seconds, 6),
        }


_STATES: dict[tuple, CandidateIndexState] = {}


def _state_for(table: torch.Tensor, key_params: tuple, make) -> CandidateIndexState:
    key = (id(table),) + key_params
    st = _STATES.get(key)
    if st is not None and st.table_ref() is not table:  # the id was reused by a new tensor
        st = None
    if st is None:
        # drop states whose tables are gone
        for k in [k for k, s in _STATES.items() if s.table_ref() is None]:
            del _STATES[k]
        st = make()
        st.table_ref = weakref.ref(table)
        _STATES[key] = st
    return st


def stats() -> list[dict]:
    """Stats of every live candidate index (one per table and configuration)."""
    return [s.stats() for s in _STATES.values() if s.table_ref() is not None]


def reset_states() -> None:
    """Forget every index (the next step rebuilds)."""
    _STATES.clear()


@register_loss("sce_faiss")
def sce_faiss(
    hidden: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    index: str = "Flat",
    num_negatives: int = 256,
    num_uniform: int = 0,
    refresh_every: int = 100,
    retrain_every: int = 0,
    nprobe: int | None = None,
    efSearch: int | None = None,
    log_every: int = 0,
    index_params: dict | None = None,
    state: CandidateIndexState | None = None,
) -> torch.Tensor:
    """Loss of ``hidden [N, d]`` against ``table [C+1, d]`` with MIPS-index hard negatives (see module doc)."""
    N, C = hidden.size(0), table.size(0) - 1
    if num_negatives < 1:
        raise ValueError(f"sce_faiss: num_negatives must be >= 1, got {num_negatives}")
    if num_uniform < 0:
        raise ValueError(f"sce_faiss: num_uniform must be >= 0, got {num_uniform}")
    if refresh_every < 0:
        raise ValueError(f"sce_faiss: refresh_every must be >= 0 (0 = never refresh), got {refresh_every}")
    K = min(int(num_negatives), C)
    index_params = dict(index_params or {})  # anything the index's constructor takes (train_size, n_buckets, ...)
    if nprobe is not None:
        index_params["nprobe"] = int(nprobe)
    if efSearch is not None:
        index_params["efSearch"] = int(efSearch)
    if state is None:
        key = (index, repr(sorted(index_params.items())), int(refresh_every), int(retrain_every))
        state = _state_for(
            table, key, lambda: CandidateIndexState(index, index_params, int(refresh_every), int(retrain_every))
        )
    with torch.no_grad():
        state.maybe_refresh(table.detach())
        t0 = time.perf_counter()
        # the positive is excluded inside the search, so each query still gets K real negatives
        _, neg = state.index.search(hidden.detach(), K, exclude=targets.view(-1, 1))
        state.search_seconds += time.perf_counter() - t0
        if num_uniform:
            neg = torch.cat([neg, sample_uniform_negatives((N, int(num_uniform)), C, neg.device)], dim=1)
    state.steps += 1
    if log_every and state.steps % log_every == 0:
        print(f"sce_faiss: {json.dumps(state.stats())}", file=sys.stderr, flush=True)
    neg = neg.to(hidden.device)
    pos = (hidden * table[targets]).sum(-1, keepdim=True)
    neg_logits = gather_dot(hidden, table, neg.clamp(min=0))
    neg_logits = neg_logits.masked_fill((neg < 1) | (neg == targets.unsqueeze(1)), float("-inf"))
    logits = torch.cat([pos, neg_logits], dim=1)
    return F.cross_entropy(logits, torch.zeros(N, dtype=torch.long, device=hidden.device))
