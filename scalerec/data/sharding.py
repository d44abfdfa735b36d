"""Per-worker sharded reading: worker r of W reads its slice of every global batch (the global batch unchanged).

The global batch order comes from ``(seed, epoch)`` only, so every worker computes the same order without
communication, and a resumed run (any W) continues from a ``(epoch, step)`` position exactly.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from scalerec.data.batching import pad_left


class ShardedSequences:
    """Training batches of a materialised dataset (``SeqDataset.train``) for worker ``rank`` of ``world_size``."""

    def __init__(self, sequences: list[np.ndarray], batch_size: int, maxlen: int, seed: int):
        if batch_size <= 0:
            raise ValueError(f"trainer.batch_size must be positive, got {batch_size}")
        self.usable = [s for s in sequences if len(s) >= 2]
        self.batch_size, self.maxlen, self.seed = batch_size, maxlen, seed

    def num_batches(self) -> int:
        return (len(self.usable) + self.batch_size - 1) // self.batch_size

    def batches(self, epoch: int, start: int = 0, rank: int = 0, world_size: int = 1
                ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(step, inputs [b, L], targets [b, L])``: rows ``rank::world_size`` of global batch ``step``."""
        if self.batch_size < world_size:
            raise ValueError(f"trainer.batch_size ({self.batch_size}) must be >= trainer.workers ({world_size})")
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.usable))
        for step in range(start, self.num_batches()):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size][rank::world_size]
            chunk = [self.usable[j] for j in idx]
            # the width of the global batch, so every worker's slice has the same [b, L] shape
            width = min(self.maxlen, max(len(self.usable[j]) - 1 for j in order[step * self.batch_size:
                                                                                 (step + 1) * self.batch_size]))
            inputs = pad_left([s[:-1][-width:] for s in chunk], width, trim=False)
            targets = pad_left([s[1:][-width:] for s in chunk], width, trim=False)
            yield step, torch.from_numpy(inputs), torch.from_numpy(targets)
