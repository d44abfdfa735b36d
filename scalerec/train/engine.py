"""The dense part's engine: plain ``torch.optim.Adam`` in one process, or DeepSpeed ZeRO over W ranks.

Both expose the same small interface to the trainer: call it like the module, ``backward(loss)``, ``step()``,
``dense_state()`` (the module's full state dict — consolidated from the partitions under ZeRO-3),
``load_dense_state(sd)``, and ``save(dir)`` / ``load(dir)`` of the optimizer state. ``averages_grads`` tells the
trainer whether gradients are averaged over the W ranks (DeepSpeed) so it can scale a global-mean loss.
"""
from __future__ import annotations

import json
import os

import torch

ZERO_STAGES = (0, 1, 2, 3)
ENGINES = ("auto", "adam", "deepspeed")


class EngineConfigError(ValueError):
    pass


def engine_kind(cfg, world_size: int) -> str:
    kind = str(cfg.trainer.engine)
    if kind not in ENGINES:
        raise EngineConfigError(f"trainer.engine must be one of {ENGINES}, got {kind!r}")
    if kind == "auto":
        kind = "deepspeed" if world_size > 1 else "adam"
    if kind == "adam" and world_size > 1:
        raise EngineConfigError(f"trainer.engine=adam trains one process; with trainer.workers={world_size} use "
                                "trainer.engine=deepspeed (or auto)")
    return kind


def _repo_path(path: str) -> str:
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), path)


def deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed JSON of ``scaleout.deepspeed.config`` with the batch, lr and ZeRO stage filled in."""
    sc = cfg.scaleout.deepspeed
    path = _repo_path(str(sc.config))
    if not os.path.exists(path):
        raise EngineConfigError(f"scaleout.deepspeed.config: file not found: {sc.config}")
    with open(path) as f:
        try:
            ds = json.load(f)
        except ValueError as exc:
            raise EngineConfigError(f"scaleout.deepspeed.config: {path} is not valid JSON: {exc}") from None
    ds.setdefault("zero_optimization", {})
    if sc.zero_stage is not None:
        ds["zero_optimization"]["stage"] = sc.zero_stage
    stage = ds["zero_optimization"].get("stage", 0)
    if stage not in ZERO_STAGES:
        raise EngineConfigError(f"scaleout.deepspeed.zero_stage (or zero_optimization.stage in {path}) must be one "
                                f"of {ZERO_STAGES}, got {stage!r}")
    B = int(cfg.trainer.batch_size)
    ds["train_micro_batch_size_per_gpu"] = max(1, B // world_size)
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * world_size
    ds["gradient_accumulation_steps"] = 1
    ds["zero_allow_untested_optimizer"] = True  # a torch.optim.Adam passed in (no CUDA/CPU-Adam build needed)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def _adam(cfg, params):
    tr = cfg.trainer
    return torch.optim.Adam(params, lr=float(tr.lr), betas=tuple(tr.betas), weight_decay=float(tr.weight_decay))


class AdamEngine:
    averages_grads = False
    zero_stage = None

    def __init__(self, module: torch.nn.Module, cfg):
        self.module = module
        self.opt = _adam(cfg, [p for p in module.parameters() if p.requires_grad])

    def __call__(self, *args):
        return self.module(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if getattr(self.module, "item_emb", None) is not None:
            with torch.no_grad():
                self.module.item_emb.weight[0].zero_()  # the padding row stays zero

    def dense_state(self) -> dict:
        return self.module.state_dict()

    def load_dense_state(self, sd: dict) -> None:
        self.module.load_state_dict(sd)

    def save(self, directory: str, rank: int) -> None:
        if rank == 0:
            torch.save(self.opt.state_dict(), os.path.join(directory, "optimizer.pt"))

    def load(self, directory: str) -> bool:
        path = os.path.join(directory, "optimizer.pt")
        if not os.path.exists(path):
            return False
        self.opt.load_state_dict(torch.load(path, weights_only=False))
        return True


class DeepSpeedEngine:
    averages_grads = True

    def __init__(self, module: torch.nn.Module, cfg, world_size: int, init_state: dict | None = None):
        import deepspeed

        ds_cfg = deepspeed_config(cfg, world_size)
        self.zero_stage = int(ds_cfg["zero_optimization"].get("stage", 0))
        params = [p for p in module.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=_adam(cfg, params),
                                                    model_parameters=params, config=ds_cfg)
        self.module = self.engine.module

    def __call__(self, *args):
        return self.engine(*args)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def _gathered(self, modifier_rank=None):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=modifier_rank,
                                                 enabled=self.zero_stage == 3)

    def dense_state(self) -> dict:
        """The module's full state (under ZeRO-3 gathered from the partitions, on every rank)."""
        with self._gathered():
            return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_dense_state(self, sd: dict) -> None:
        with self._gathered(modifier_rank=0):
            self.module.load_state_dict(sd)

    def save(self, directory: str, rank: int) -> None:
        self.engine.save_checkpoint(os.path.join(directory, "ds"), tag="ds")

    def load(self, directory: str) -> bool:
        path = os.path.join(directory, "ds")
        if not os.path.isdir(path):
            return False
        self.engine.load_checkpoint(path, tag="ds", load_module_strict=False)
        return True


def make_engine(cfg, module: torch.nn.Module, world_size: int):
    if engine_kind(cfg, world_size) == "adam":
        return AdamEngine(module, cfg)
    if not bool(cfg.scaleout.ray.use_gpu):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return DeepSpeedEngine(module, cfg, world_size)
