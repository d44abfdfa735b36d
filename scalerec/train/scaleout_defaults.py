"""Defaults of the ``scaleout:`` config section (no heavy imports: the config loader may merge them).

The training config (``scalerec/train/config.py``) can take them with ``DEFAULTS.update(SCALEOUT_DEFAULTS)``,
so that one YAML with a ``scaleout:`` section serves ``scalerec train`` and ``python -m launch.train``.
"""
from __future__ import annotations

from typing import Any

SCALEOUT_DEFAULTS: dict[str, Any] = {
    "scaleout": {
        # sharded: auto = row-sharded when trainer.workers > 1 (true / false force it, with any worker count)
        "table": {"sharded": "auto", "dtype": "fp32", "optimizer": "adagrad", "lr": 0.05, "layout": "snake",
                  "init_std": None},
        "deepspeed": {"config": "launch/configs/deepspeed_zero2.json", "zero_stage": None},
        "ray": {"address": "", "num_cpus": 0, "cpus_per_worker": 1, "use_gpu": False, "storage_path": "",
                "name": "", "max_failures": 0},
        "checkpoint_every": 0,  # steps between checkpoints; 0 = at the end of every epoch
        "num_to_keep": 2,
        "fail_at_step": -1,  # tests: rank 1 (rank 0 at W = 1) dies at this global step on the first attempt
        "test_max_cases": 0,  # 0 = every test case
    }
}
