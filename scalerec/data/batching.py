"""Training batches: sequences truncated on the left to ``maxlen``, left-padded with 0, next-item targets."""
from __future__ import annotations

import numpy as np
import torch


def pad_left(seqs: list[np.ndarray], maxlen: int, trim: bool = True) -> np.ndarray:
    """Stack the last ``maxlen`` items of each sequence, left-padded with 0.

    With ``trim`` the width is the longest (truncated) sequence of the batch instead of ``maxlen``; the
    model's positions are counted from the right edge, so trimming does not change its output.
    """
    width = min(maxlen, max((len(s) for s in seqs), default=1)) if trim else maxlen
    width = max(width, 1)
    out = np.zeros((len(seqs), width), np.int64)
    for i, s in enumerate(seqs):
        s = s[-width:]
        if len(s):
            out[i, width - len(s) :] = s
    return out


def training_pairs(seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return seq[:-1], seq[1:]


def iterate_batches(
    sequences: list[np.ndarray],
    batch_size: int,
    maxlen: int,
    rng: np.random.Generator,
    shuffle: bool = True,
):
    """Yield ``(inputs [B, L], targets [B, L])`` int64 tensors; target 0 marks padding positions."""
    if batch_size <= 0:
        raise ValueError(f"trainer.batch_size must be positive, got {batch_size}")
    if maxlen <= 0:
        raise ValueError(f"model.maxlen must be positive, got {maxlen}")
    usable = [s for s in sequences if len(s) >= 2]
    order = rng.permutation(len(usable)) if shuffle else np.arange(len(usable))
    for start in range(0, len(order), batch_size):
        chunk = [usable[j] for j in order[start : start + batch_size]]
        inputs = pad_left([s[:-1] for s in chunk], maxlen)
        targets = pad_left([s[1:] for s in chunk], maxlen)
        yield torch.from_numpy(inputs), torch.from_numpy(targets)


def num_batches(sequences: list[np.ndarray], batch_size: int) -> int:
    n = sum(1 for s in sequences if len(s) >= 2)
    return (n + batch_size - 1) // batch_size
