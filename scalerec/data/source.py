"""Where a training run's data comes from: a dataset file (materialised) or a ``synthetic:`` catalog (streamed).

``DataSource`` gives rank ``r`` of ``W`` its slice of every global batch (the global batch and its order
depend on ``(seed, epoch)`` only, never on W), the evaluation sets and item popularity. One class serves the
in-process run (W = 1) and every worker of a scaled-out one.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from scalerec.data.dataset import EvalSet, load_dataset


def dataset_from_config(cfg):
    """The ``SeqDataset`` of a training config's ``data`` section."""
    d = cfg.data
    return load_dataset(d.path, None if d.format == "auto" else d.format, split=d.split,
                        min_item_count=int(d.min_item_count), min_user_count=int(d.min_user_count),
                        temporal_quantile=float(d.temporal_quantile))


class DataSource:
    """A real dataset (materialised; each worker reads its slice) or a streamed synthetic catalog."""

    def __init__(self, cfg, dataset=None):
        path = str(cfg.data.path)
        B, L, seed = int(cfg.trainer.batch_size), int(cfg.model.maxlen), int(cfg.trainer.seed)
        if path.startswith("synthetic:") and dataset is None:
            from scalerec.data.synthetic import parse_spec

            self.synthetic = parse_spec(path)
            self.num_items = self.synthetic.items
            self._steps = self.synthetic.num_batches(B)
            self.dataset = None
        else:
            from scalerec.data.sharding import ShardedSequences

            self.synthetic = None
            self.dataset = dataset if dataset is not None else dataset_from_config(cfg)
            self.num_items = self.dataset.num_items
            self.reader = ShardedSequences(self.dataset.train, B, L, seed)
            self._steps = self.reader.num_batches()
        self.B, self.L = B, L
        cap = int(cfg.trainer.max_steps_per_epoch)
        self.steps_per_epoch = min(self._steps, cap) if cap > 0 else self._steps

    # ------------------------------------------------------------------ identity (checkpoints)
    def meta(self) -> dict:
        """What a checkpoint records to refuse another dataset and map ids back (``item_ids`` is separate)."""
        if self.synthetic is not None:
            return {"name": self.synthetic.spec(), "num_items": self.num_items, "fingerprint": self.synthetic.spec()}
        return {"name": self.dataset.name, "num_items": self.num_items, "fingerprint": self.dataset.fingerprint}

    def item_ids(self) -> np.ndarray | None:
        """Original item id of internal id i + 1 (``None`` for a synthetic catalog: the ids are the item ids)."""
        return None if self.dataset is None else np.asarray(self.dataset.item_ids)

    # ------------------------------------------------------------------ batches
    def batches(self, epoch: int, start: int, rank: int, world: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(step, inputs [b, L], targets [b, L])``: this rank's rows of global batches ``start..``."""
        it = (self.synthetic.batches(self.B, self.L, epoch, start, rank, world) if self.synthetic is not None
              else self.reader.batches(epoch, start, rank, world))
        for step, x, y in it:
            if step >= self.steps_per_epoch:
                return
            yield step, x, y

    def eval_set(self, split: str, max_cases: int | None) -> EvalSet:
        if self.synthetic is not None:
            return self.synthetic.eval_set(split, max_cases)
        ev = self.dataset.eval_set(split)
        if max_cases:
            ev = EvalSet(ev.users[:max_cases], ev.inputs[:max_cases], ev.targets[:max_cases])
        return ev

    def popularity(self) -> torch.Tensor | None:
        """Training counts per item ``[C + 1]`` (``None`` for a synthetic catalog: its ids are in popularity order)."""
        if self.dataset is None:
            return None
        counts = np.zeros(self.num_items + 1, np.int64)
        for s in self.dataset.train:
            np.add.at(counts, s, 1)
        return torch.from_numpy(counts)
