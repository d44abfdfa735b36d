"""Sequential-recommendation datasets: remapped item ids, per-user chronological sequences, splits.

Item ids are remapped to ``1..C`` in order of first appearance; ``0`` is padding. ``item_ids[i]`` is the
original id of internal id ``i + 1`` and is saved in checkpoints so predictions map back.

Splits:
- ``loo`` (leave-one-out): the last item of each user is the test target, the second-to-last the
  validation target; training sees the rest. Users with fewer than 3 interactions cannot be split: they are
  kept for training only and counted in ``stats["users_too_short"]``.
- ``temporal`` (the SCE paper's global temporal split): cut at the ``quantile`` of all timestamps;
  training uses only users with no interaction after the cut; for the other (test) users the last
  post-cut item is the test target and the item before it the validation target.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from scalerec.data.readers import DataError, Interactions, read_interactions


@dataclass
class EvalSet:
    """Evaluation cases: ``inputs[j]`` is user j's history (internal ids), ``targets[j]`` the held-out item."""

    users: np.ndarray
    inputs: list[np.ndarray]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class SeqDataset:
    name: str
    num_items: int
    item_ids: np.ndarray  # original id of internal id i+1
    train: list[np.ndarray]  # training sequences (internal ids, chronological)
    valid: EvalSet
    test: EvalSet
    split: str
    stats: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha1()
        h.update(str(self.num_items).encode())
        h.update(np.ascontiguousarray(self.item_ids).tobytes())
        return h.hexdigest()[:16]

    def train_sequences(self) -> list[np.ndarray]:
        return self.train

    def eval_set(self, split: str) -> EvalSet:
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        return self.valid if split == "valid" else self.test

    def describe(self) -> dict:
        return {
            "name": self.name,
            "split": self.split,
            "users": int(self.stats.get("users", 0)),
            "items": int(self.num_items),
            "interactions": int(self.stats.get("interactions", 0)),
            "train_sequences": len(self.train),
            "valid_cases": len(self.valid),
            "test_cases": len(self.test),
            "users_too_short": int(self.stats.get("users_too_short", 0)),
            "seq_len_mean": float(self.stats.get("seq_len_mean", 0.0)),
            "seq_len_median": float(self.stats.get("seq_len_median", 0.0)),
            "seq_len_max": int(self.stats.get("seq_len_max", 0)),
            **{k: v for k, v in self.stats.items() if k.startswith("filtered_")},
        }


def _filter(inter: Interactions, min_item_count: int, min_user_count: int) -> tuple[Interactions, dict]:
    """Keep items with >= min_item_count distinct users and users with >= min_user_count interactions."""
    users, items, ts = inter.users, inter.items, inter.timestamps
    n0 = len(items)
    while True:
        keep = np.ones(len(items), bool)
        if min_item_count > 1:
            pairs = np.unique(np.stack([items, users]), axis=1)
            it, cnt = np.unique(pairs[0], return_counts=True)
            keep &= np.isin(items, it[cnt >= min_item_count])
        if min_user_count > 1:
            us, cnt = np.unique(users, return_counts=True)
            keep &= np.isin(users, us[cnt >= min_user_count])
        if keep.all():
            break
        users, items, ts = users[keep], items[keep], ts[keep]
    return (
        Interactions(users, items, ts, inter.has_timestamps, inter.source),
        {"filtered_interactions": int(n0 - len(items))},
    )


def _user_sequences(inter: Interactions):
    """Group by user, each user's interactions ordered by (timestamp, file order). Yields (user, items, ts)."""
    order = np.lexsort((np.arange(len(inter.items)), inter.timestamps, inter.users))
    u, it, ts = inter.users[order], inter.items[order], inter.timestamps[order]
    bounds = np.flatnonzero(np.diff(u)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(u)]])
    # keep users in order of first appearance in the file (stable, reproducible)
    first_pos = np.full(len(starts), 0, np.int64)
    first_in_file = {}
    for k, user in enumerate(inter.users):
        if user not in first_in_file:
            first_in_file[user] = k
    for j, s in enumerate(starts):
        first_pos[j] = first_in_file[u[s]]
    for j in np.argsort(first_pos, kind="stable"):
        yield u[starts[j]], it[starts[j] : ends[j]], ts[starts[j] : ends[j]]


def build_dataset(
    inter: Interactions,
    split: str = "loo",
    min_item_count: int = 0,
    min_user_count: int = 0,
    temporal_quantile: float = 0.95,
    name: str | None = None,
) -> SeqDataset:
    if split not in ("loo", "temporal"):
        raise ValueError(f"data.split must be 'loo' or 'temporal', got {split!r}")
    if not 0.0 < temporal_quantile < 1.0:
        raise ValueError(f"data.temporal_quantile must lie in (0, 1), got {temporal_quantile}")
    for fname, v in (("min_item_count", min_item_count), ("min_user_count", min_user_count)):
        if v < 0:
            raise ValueError(f"data.{fname} must be >= 0, got {v}")
    stats: dict = {}
    if min_item_count > 1 or min_user_count > 1:
        inter, st = _filter(inter, min_item_count, min_user_count)
        stats.update(st)
        if len(inter) == 0:
            raise DataError(f"{inter.source}: no interactions left after filtering "
                            f"(min_item_count={min_item_count}, min_user_count={min_user_count})")
    # remap items to 1..C in order of first appearance
    uniq, first_idx, inverse = np.unique(inter.items, return_index=True, return_inverse=True)
    order = np.argsort(first_idx, kind="stable")
    rank = np.empty(len(uniq), np.int64)
    rank[order] = np.arange(len(uniq))
    internal = rank[inverse] + 1
    item_ids = uniq[order]
    mapped = Interactions(inter.users, internal, inter.timestamps, inter.has_timestamps, inter.source)

    train: list[np.ndarray] = []
    ev = {"valid": ([], [], []), "test": ([], [], [])}
    too_short = 0
    n_users = 0
    cut = None
    if split == "temporal":
        cut = np.quantile(inter.timestamps, temporal_quantile)
        stats["temporal_cut"] = float(cut)
    lengths = []
    for user, seq, ts in _user_sequences(mapped):
        n_users += 1
        lengths.append(len(seq))
        if split == "loo":
            if len(seq) < 3:
                too_short += 1
                train.append(seq)
                continue
            train.append(seq[:-2])
            for which, t in (("valid", len(seq) - 2), ("test", len(seq) - 1)):
                ev[which][0].append(user)
                ev[which][1].append(seq[:t])
                ev[which][2].append(seq[t])
        else:
            post = np.flatnonzero(ts > cut)
            if len(post) == 0:
                if len(seq) >= 2:
                    train.append(seq)
                else:
                    too_short += 1
                continue
            t_test = post[-1]
            if t_test < 2:  # needs at least a validation target and one history item before it
                too_short += 1
                continue
            for which, t in (("valid", t_test - 1), ("test", t_test)):
                ev[which][0].append(user)
                ev[which][1].append(seq[:t])
                ev[which][2].append(seq[t])
    lengths = np.asarray(lengths)
    stats.update({"users": n_users, "interactions": int(len(inter)), "users_too_short": too_short,
                  "seq_len_mean": float(lengths.mean()), "seq_len_median": float(np.median(lengths)),
                  "seq_len_max": int(lengths.max())})
    sets = {k: EvalSet(np.asarray(v[0]), v[1], np.asarray(v[2], np.int64)) for k, v in ev.items()}
    return SeqDataset(name or inter.source, int(len(item_ids)), item_ids, train, sets["valid"], sets["test"], split, stats)


def load_dataset(
    path: str,
    fmt: str | None = None,
    split: str = "loo",
    min_item_count: int = 0,
    min_user_count: int = 0,
    temporal_quantile: float = 0.95,
) -> SeqDataset:
    inter = read_interactions(path, fmt)
    if split == "temporal" and not inter.has_timestamps:
        # Files without timestamps (Beauty/Video .txt) only give each user's order; the file position is
        # then the only global clock we have. Say so instead of pretending.
        import warnings

        warnings.warn(f"{path}: no timestamps; the temporal split uses file order as time", stacklevel=2)
    return build_dataset(inter, split, min_item_count, min_user_count, temporal_quantile, name=path)
