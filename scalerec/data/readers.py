"""Readers for interaction files. Each returns an :class:`Interactions` table in file order.

Formats (``fmt``):
- ``user_seq``  — one user per line: ``user i1 i2 …`` in chronological order (Amazon Beauty, Yelp in the SASRec/SCE releases)
- ``user_item`` — one interaction per line: ``user item``, chronological per user (Video in the SCE release)
- ``movielens`` — MovieLens ``u.data``: tab-separated ``user item rating timestamp``
- ``csv`` / ``parquet`` — columns ``user``, ``item`` and optionally ``timestamp``

Files without timestamps get the interaction's position in the file as its time (``has_timestamps=False``),
which keeps each user's chronological order. Any malformed line raises ``DataError`` naming file and line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


class DataError(ValueError):
    """Malformed or unusable input data; the message names the file and line."""


@dataclass
class Interactions:
    users: np.ndarray  # int64 original user ids
    items: np.ndarray  # int64 original item ids
    timestamps: np.ndarray  # int64 (or line order when the file has none)
    has_timestamps: bool
    source: str

    def __len__(self) -> int:
        return len(self.items)


FORMATS = ("user_seq", "user_item", "movielens", "csv", "parquet")


def detect_format(path: str) -> str:
    base = os.path.basename(path).lower()
    if base.endswith(".parquet"):
        return "parquet"
    if base.endswith(".csv"):
        return "csv"
    if base == "u.data" or base.endswith(".data"):
        return "movielens"
    with open(path) as fh:
        for line in fh:
            if line.strip():
                return "user_item" if len(line.split()) == 2 else "user_seq"
    raise DataError(f"{path}: file is empty")


def _int(tok: str, path: str, lineno: int, what: str) -> int:
    try:
        return int(tok)
    except ValueError:
        raise DataError(f"{path}:{lineno}: {what} {tok!r} is not an integer") from None


def read_interactions(path: str, fmt: str | None = None) -> Interactions:
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    fmt = fmt or "auto"
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; allowed: auto, {', '.join(FORMATS)}")
    reader = {"user_seq": _read_user_seq, "user_item": _read_user_item, "movielens": _read_movielens,
              "csv": _read_table, "parquet": _read_table}[fmt]
    inter = reader(path) if reader is not _read_table else _read_table(path, fmt)
    if len(inter) == 0:
        raise DataError(f"{path}: no interactions found (empty file?)")
    return inter


def _read_user_seq(path: str) -> Interactions:
    users, items = [], []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            toks = line.split()
            if not toks:
                continue
            u = _int(toks[0], path, lineno, "user id")
            if len(toks) < 2:
                raise DataError(f"{path}:{lineno}: user {u} has no items (expected 'user i1 i2 ...')")
            for tok in toks[1:]:
                items.append(_int(tok, path, lineno, "item id"))
            users.extend([u] * (len(toks) - 1))
    n = len(items)
    return Interactions(np.asarray(users, np.int64), np.asarray(items, np.int64), np.arange(n, dtype=np.int64), False, path)


def _read_columns(path: str, sep: str | None, ncols: int, names: tuple[str, ...]) -> list[list[int]]:
    cols: list[list[int]] = [[] for _ in range(ncols)]
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            toks = line.split(sep) if sep else line.split()
            toks = [t.strip() for t in toks]
            if not any(toks):
                continue
            if len(toks) < ncols:
                raise DataError(f"{path}:{lineno}: expected {ncols} fields ({', '.join(names)}), got {len(toks)}")
            for j in range(ncols):
                cols[j].append(_int(toks[j], path, lineno, names[j]))
    return cols


def _read_user_item(path: str) -> Interactions:
    users, items = _read_columns(path, None, 2, ("user id", "item id"))
    n = len(items)
    return Interactions(np.asarray(users, np.int64), np.asarray(items, np.int64), np.arange(n, dtype=np.int64), False, path)


def _read_movielens(path: str) -> Interactions:
    users, items, _ratings, ts = _read_columns(path, "\t", 4, ("user id", "item id", "rating", "timestamp"))
    return Interactions(np.asarray(users, np.int64), np.asarray(items, np.int64), np.asarray(ts, np.int64), True, path)


def _read_table(path: str, fmt: str) -> Interactions:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path) if fmt == "parquet" else pacsv.read_csv(path)
    except Exception as exc:  # pyarrow raises several types; report them uniformly
        raise DataError(f"{path}: cannot read {fmt}: {exc}") from None
    missing = [c for c in ("user", "item") if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected user, item[, timestamp], got {table.column_names}")
    out = {}
    for col in ("user", "item", "timestamp"):
        if col not in table.column_names:
            continue
        arr = table.column(col).to_numpy(zero_copy_only=False)
        if arr.dtype.kind not in "iu":
            bad = next((i for i, v in enumerate(arr) if not _is_int_like(v)), None)
            if bad is not None:
                raise DataError(f"{path}: row {bad + 1}: column {col!r} value {arr[bad]!r} is not an integer")
            arr = arr.astype(np.int64)
        out[col] = np.asarray(arr, np.int64)
    has_ts = "timestamp" in out
    n = len(out["item"])
    return Interactions(out["user"], out["item"], out.get("timestamp", np.arange(n, dtype=np.int64)), has_ts, path)


def _is_int_like(v) -> bool:
    try:
        return float(v) == int(v)
    except (TypeError, ValueError):
        return False
