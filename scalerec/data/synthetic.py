"""A synthetic catalog of 10^6-10^8 items whose user sequences are generated, never stored.

Items ``1..C`` are in popularity order (Zipf with exponent ``zipf``) and belong to ``clusters`` latent
clusters (item i is in cluster (i-1) mod K, so a cluster is a strided slice of ids and each cluster has its
own Zipf head). A user's sequence walks the clusters: after an item of cluster c the next item stays in c
with probability ``stay``, moves to c+1 (mod K) with probability ``shift``, else jumps to a random cluster;
within the cluster the item is Zipf-distributed. A sequence model can learn the cluster transitions (the
hidden structure), popularity alone cannot, so validation NDCG separates a learning model from a popularity
baseline.

Everything is a pure function of ``(seed, user)``: user u's sequence comes from
``numpy.random.default_rng([seed, u])`` with O(length) work and O(1) memory for any C, so a worker (or a
resumed run) can start at any batch. Users ``0..users-1`` train; the next ``eval_users`` users (disjoint)
give the validation and test cases (their last item is the target, the rest the history).

Spec strings (``scalerec info synthetic:items=1e7,users=1e6``) name a catalog; unknown keys are errors.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Iterator

import numpy as np
import torch

from scalerec.data.batching import pad_left
from scalerec.data.dataset import EvalSet, SeqDataset


@dataclass(frozen=True)
class SyntheticCatalog:
    items: int = 1_000_000
    users: int = 100_000
    seed: int = 0
    zipf: float = 0.9
    clusters: int = 1000
    stay: float = 0.6
    shift: float = 0.3
    len: int = 50  # mean sequence length (lengths are uniform in [len/2, 3 len/2])
    eval_users: int = 2000

    def __post_init__(self):
        for f in ("items", "users", "clusters", "len", "eval_users"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"synthetic catalog: {f} must be positive, got {getattr(self, f)}")
        if self.clusters > self.items:
            raise ValueError(f"synthetic catalog: clusters ({self.clusters}) must not exceed items ({self.items})")
        if not (0 <= self.stay and 0 <= self.shift and self.stay + self.shift <= 1):
            raise ValueError("synthetic catalog: stay and shift must be >= 0 with stay + shift <= 1")
        if self.zipf <= 0 or self.zipf == 1.0:
            raise ValueError(f"synthetic catalog: zipf must be positive and != 1, got {self.zipf}")

    # ------------------------------------------------------------------ generation
    def _zipf_rank(self, rng: np.random.Generator, n: int, size: int) -> np.ndarray:
        """0-based ranks in [0, n) with P(j) ~ (j+1)^-zipf (inverse CDF of the continuous power law)."""
        a = 1.0 - self.zipf
        u = rng.random(size)
        j = np.floor((((n + 1.0) ** a - 1.0) * u + 1.0) ** (1.0 / a)) - 1.0
        return np.minimum(j.astype(np.int64), n - 1)

    def sequence(self, user: int) -> np.ndarray:
        """User ``user``'s item ids (int64, 1..C), deterministic in ``(seed, user)``."""
        rng = np.random.default_rng([self.seed, int(user)])
        n = int(rng.integers(max(2, self.len // 2), self.len + self.len // 2 + 1))
        K = self.clusters
        r = rng.random(n)
        jumps = rng.integers(0, K, n)
        c = np.empty(n, np.int64)
        cur = int(self._zipf_rank(rng, K, 1)[0])  # popular clusters start more sequences
        for t in range(n):
            if t:
                cur = cur if r[t] < self.stay else ((cur + 1) % K if r[t] < self.stay + self.shift else int(jumps[t]))
            c[t] = cur
        per_cluster = (self.items - c + K - 1) // K  # cluster c holds ids c+1, c+1+K, ...
        j = np.minimum(self._zipf_rank(rng, int(per_cluster.max()), n), per_cluster - 1)
        return c + 1 + K * j

    def popularity(self, sample_users: int = 2000) -> np.ndarray:
        """Empirical item counts over the first ``sample_users`` users (``[C + 1]``, index 0 unused)."""
        counts = np.zeros(self.items + 1, np.int64)
        for u in range(min(sample_users, self.users)):
            np.add.at(counts, self.sequence(u), 1)
        return counts

    # ------------------------------------------------------------------ batches and evaluation
    def num_batches(self, batch_size: int) -> int:
        return (self.users + batch_size - 1) // batch_size

    def batches(self, batch_size: int, maxlen: int, epoch: int = 0, start: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(step, inputs [b, L], targets [b, L])`` of this worker's slice of each global batch.

        The global batch ``step`` holds ``batch_size`` users (a permutation of users per epoch, by a
        seeded affine map, so no O(users) array); worker ``rank`` of ``world_size`` takes every
        ``world_size``-th of them. ``start`` skips to a batch without generating the earlier ones.
        """
        if batch_size < world_size:
            raise ValueError(f"trainer.batch_size ({batch_size}) must be >= trainer.workers ({world_size})")
        perm = _AffinePerm(self.users, self.seed * 7919 + epoch)
        for step in range(start, self.num_batches(batch_size)):
            lo = step * batch_size
            users = [perm(u) for u in range(lo + rank, min(lo + batch_size, self.users), world_size)]
            seqs = [self.sequence(u) for u in users]
            yield step, torch.from_numpy(pad_left([s[:-1] for s in seqs], maxlen)), \
                torch.from_numpy(pad_left([s[1:] for s in seqs], maxlen))

    def eval_set(self, split: str = "valid", max_cases: int | None = None) -> EvalSet:
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        half = self.eval_users // 2 if self.eval_users > 1 else 1
        first = self.users + (0 if split == "valid" else half)
        n = half if max_cases is None else min(half, max_cases)
        seqs = [self.sequence(u) for u in range(first, first + n)]
        return EvalSet(np.arange(first, first + n), [s[:-1] for s in seqs], np.array([s[-1] for s in seqs]))

    def to_dataset(self) -> SeqDataset:
        """Materialise as a ``SeqDataset`` (small catalogs only: every training sequence in memory)."""
        train = [self.sequence(u) for u in range(self.users)]
        lens = np.array([len(s) for s in train])
        stats = {"users": self.users + self.eval_users, "interactions": int(lens.sum()),
                 "seq_len_mean": float(lens.mean()), "seq_len_median": float(np.median(lens)),
                 "seq_len_max": int(lens.max())}
        return SeqDataset(self.spec(), self.items, np.arange(1, self.items + 1), train, self.eval_set("valid"),
                          self.eval_set("test"), "synthetic", stats)

    def spec(self) -> str:
        return "synthetic:" + ",".join(f"{k}={v}" for k, v in asdict(self).items())

    def describe(self) -> dict:
        mean_len = self.len // 2 + (self.len + self.len // 2 - max(2, self.len // 2)) / 2  # E[uniform length]
        return {"name": self.spec(), "split": "synthetic", "users": self.users + self.eval_users,
                "items": self.items, "interactions": int(round(mean_len * self.users)),
                "train_sequences": self.users, "valid_cases": self.eval_users // 2,
                "test_cases": self.eval_users - self.eval_users // 2, "users_too_short": 0,
                "seq_len_mean": float(mean_len), "seq_len_max": int(self.len + self.len // 2),
                "zipf": self.zipf, "clusters": self.clusters, "seed": self.seed}


class _AffinePerm:
    """A permutation of 0..n-1 as ``u -> (a u + b) mod n`` with gcd(a, n) = 1 (O(1) memory)."""

    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        a = int(rng.integers(1, max(2, n)))
        while np.gcd(a, n) != 1:
            a += 1
        self.n, self.a, self.b = n, a % max(n, 1) or 1, int(rng.integers(0, n))

    def __call__(self, u: int) -> int:
        return (self.a * u + self.b) % self.n


def parse_spec(spec: str) -> SyntheticCatalog:
    """``synthetic:items=1e7,users=1e6,seed=0`` -> ``SyntheticCatalog`` (numbers like 1e7 allowed)."""
    if not spec.startswith("synthetic:"):
        raise ValueError(f"a synthetic catalog spec starts with 'synthetic:', got {spec!r}")
    kinds = {f.name: f.type for f in fields(SyntheticCatalog)}
    kw = {}
    for part in filter(None, spec[len("synthetic:"):].split(",")):
        if "=" not in part:
            raise ValueError(f"{spec}: {part!r} must look like key=value")
        k, v = part.split("=", 1)
        if k not in kinds:
            raise ValueError(f"{spec}: unknown key {k!r}; allowed: {', '.join(kinds)}")
        kw[k] = float(v) if kinds[k] in (float, "float") else int(float(v))
    return SyntheticCatalog(**kw)


def describe_spec(spec: str) -> dict:
    return parse_spec(spec).describe()
