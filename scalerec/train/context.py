"""Where a rank of a training run lives: in this process, or in a Ray Train worker.

The trainer (``scalerec.train.trainer.fit``) is the same in both; a context gives it its rank and world size,
the process group of the row-sharded table, the checkpoint to restore from, and how to publish a checkpoint:

* ``LocalRun`` — ``trainer.workers=1`` in this process, or one rank of a ``torch.distributed`` group started
  by the caller (tests start W gloo ranks this way). Checkpoints go to ``OUTPUT_DIR/checkpoint``;
  ``trainer.resume`` (or ``--resume``) names the one to continue from.
* ``RayRun`` — a Ray Train ``TorchTrainer`` worker. Checkpoints go through ``ray.train.report`` into the run's
  storage; a restarted group (a worker died, ``FailureConfig``) or a re-run of the same ``ray.name`` resumes
  from ``ray.train.get_checkpoint()``, else from the newest complete checkpoint in storage, else from
  ``trainer.resume``.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from typing import Callable

import torch.distributed as dist

from scalerec.dist import collectives as coll
from scalerec.train.checkpoint import is_complete, publish, read_state


class LocalRun:
    progress_bars = True

    def __init__(self, output_dir: str, resume: str | None = None):
        self.rank, self.world_size = coll.rank(), coll.world_size()
        self.table_group = dist.new_group(backend="gloo") if self.world_size > 1 else None
        self.output_dir, self.resume = output_dir, resume or None
        self.restore_source = None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.table_group)

    @contextlib.contextmanager
    def restore_dir(self):
        if self.resume and not is_complete(self.resume):
            read_state(self.resume)  # a clear error for a missing or foreign directory
            raise ValueError(f"{self.resume}: incomplete checkpoint (missing model.pt or table shards)")
        self.restore_source = "trainer.resume" if self.resume else None
        yield self.resume

    def save(self, name: str, write: Callable[[str], None], metrics: dict | None = None) -> str:
        """Write checkpoint ``OUTPUT_DIR/name`` (every rank adds its files), then publish it whole."""
        final = os.path.join(self.output_dir, name)
        tmp = final + ".tmp"
        if self.rank == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp)
        self.barrier()
        write(tmp)
        self.barrier()
        if self.rank == 0:
            publish(tmp, final)
        self.barrier()
        return final

    def report(self, metrics: dict) -> None:
        pass


class RayRun:
    progress_bars = False

    def __init__(self, output_dir: str, storage: str, resume: str | None = None):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.table_group = dist.new_group(backend="gloo") if self.world_size > 1 else None
        self.output_dir, self.storage, self.resume = output_dir, storage, resume or None
        self.restore_source = None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.table_group)

    def _newest_complete(self) -> str | None:
        best, best_step = None, -1
        for d in glob.glob(os.path.join(self.storage, "checkpoint_*")):
            if is_complete(d):
                g = read_state(d)["global_step"]
                if g > best_step:
                    best, best_step = d, g
        return best

    @contextlib.contextmanager
    def restore_dir(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            self.restore_source = "ray"
            with ckpt.as_directory() as d:
                yield d
            return
        # a checkpoint written but not yet registered by the controller when a worker died is still complete
        found = self._newest_complete()
        if found:
            self.restore_source = "storage"
            yield found
            return
        self.restore_source = "trainer.resume" if self.resume else None
        yield self.resume

    def save(self, name: str, write: Callable[[str], None], metrics: dict | None = None) -> str:
        """``checkpoint``: reported to Ray (every rank's files join one checkpoint in storage); ``best``: written
        to ``OUTPUT_DIR/best`` (a path every rank must see) and published whole."""
        if name != "checkpoint":
            return LocalRun.save(self, name, write)  # type: ignore[arg-type]
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as d:
            write(d)
            ray.train.report(metrics or {}, checkpoint=Checkpoint.from_directory(d))
        return ""

    def report(self, metrics: dict) -> None:
        import ray.train

        ray.train.report(metrics)
