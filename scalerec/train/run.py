"""Starting a training run: in this process (``trainer.workers=1``, no Ray needed) or on W Ray Train workers.

Both paths run the same ``scalerec.train.trainer.fit``. The Ray path starts a ``TorchTrainer`` with one
worker per rank (gloo on CPU, NCCL on GPU); with ``RAY_ADDRESS`` set (``ray job submit`` sets it) or
``scaleout.ray.address`` it joins that cluster, otherwise it starts a local Ray in this process. Every check
that can fail runs before any worker starts (``validate_run``), each with one error naming the config field.
"""
from __future__ import annotations

import json
import os

from omegaconf import OmegaConf

from scalerec.models.sharded_table import DTYPES, LAYOUTS, OPTIMIZERS
from scalerec.train.engine import EngineConfigError, deepspeed_config, engine_kind


class RunConfigError(ValueError):
    pass


def _num_items(cfg) -> int:
    if str(cfg.data.path).startswith("synthetic:"):
        from scalerec.data.synthetic import parse_spec

        return parse_spec(str(cfg.data.path)).items
    from scalerec.data.source import dataset_from_config

    return dataset_from_config(cfg).num_items


def validate_run(cfg, num_items: int, cluster_cpus: float | None = None) -> None:
    """Every run-level check, with one error naming the field (before any worker starts)."""
    from scalerec.losses.registry import has_sharded_form
    from scalerec.train.trainer import loss_from_config, table_is_sharded

    W = int(cfg.trainer.workers)
    t = cfg.scaleout.table
    if W > num_items:
        raise RunConfigError(f"trainer.workers ({W}) is larger than the catalog (C = {num_items} items)")
    try:
        sharded = table_is_sharded(cfg)
        kind = engine_kind(cfg, W)
        stage = deepspeed_config(cfg, W)["zero_optimization"].get("stage", 0) if kind == "deepspeed" else None
    except (EngineConfigError, ValueError) as exc:
        raise RunConfigError(str(exc)) from None
    for key, allowed in (("dtype", sorted(DTYPES)), ("optimizer", OPTIMIZERS), ("layout", LAYOUTS)):
        if str(t[key]) not in allowed:
            raise RunConfigError(f"scaleout.table.{key} must be one of {tuple(allowed)}, got {t[key]!r}")
    name = str(cfg.loss.name)
    if sharded and W > 1 and not has_sharded_form(name):
        from scalerec.losses.registry import available_losses

        ok = [n for n in available_losses() if has_sharded_form(n)]
        raise RunConfigError(f"loss.name {name!r} has no row-sharded form; with scaleout.table.sharded and "
                             f"trainer.workers > 1 use one of {ok}")
    loss_from_config(cfg)  # unknown loss parameters
    if stage == 3 and not sharded:
        raise RunConfigError("scaleout.deepspeed.zero_stage=3 partitions the module's parameters, which a loss "
                             "over a dense item table reads outside the forward: use scaleout.table.sharded=true")
    need = W * float(cfg.scaleout.ray.cpus_per_worker)
    if cluster_cpus is not None and need > cluster_cpus:
        raise RunConfigError(f"trainer.workers ({W}) x scaleout.ray.cpus_per_worker "
                             f"({cfg.scaleout.ray.cpus_per_worker}) = {need:g} CPUs, but the Ray cluster has "
                             f"{cluster_cpus:g}")


def train(cfg, resume: str | None = None, dataset=None, log=print) -> dict:
    """Train per ``cfg``; returns ``best_epoch``, ``valid``, ``test``, ``epochs``, ``seconds``, ``output_dir``…"""
    if int(cfg.trainer.workers) > 1 or str(cfg.scaleout.ray.address):
        if resume:
            cfg.trainer.resume = resume
        return run_on_ray(cfg)
    from scalerec.train.context import LocalRun
    from scalerec.train.trainer import fit

    validate_run(cfg, dataset.num_items if dataset is not None else _num_items(cfg))
    return fit(cfg, LocalRun(str(cfg.output_dir), resume or str(cfg.trainer.resume) or None), dataset, log)


def _worker_log(msg: str) -> None:
    print(f"[scalerec worker] {msg}", flush=True)


def ray_worker(config: dict) -> dict:
    """The ``train_loop_per_worker`` of the Ray path: one rank of ``fit``."""
    import torch
    import torch.distributed as dist

    from scalerec.train.context import RayRun
    from scalerec.train.trainer import fit

    cfg = OmegaConf.create(config["cfg"])
    use_gpu = bool(cfg.scaleout.ray.use_gpu)
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(max(1, int(cfg.trainer.threads) or int(float(cfg.scaleout.ray.cpus_per_worker))))
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    run = RayRun(str(cfg.output_dir), str(config["storage"]), str(cfg.trainer.resume) or None)
    return fit(cfg, run, log=_worker_log)


def _init_ray(cfg) -> None:
    import ray

    if ray.is_initialized():
        return
    address = str(cfg.scaleout.ray.address) or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        n = int(cfg.scaleout.ray.num_cpus) or os.cpu_count()
        # address="local": a new in-process cluster, never one that `ray start` left running on this machine
        ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=True)


def run_on_ray(cfg) -> dict:
    """Train on ``trainer.workers`` Ray Train workers; returns rank 0's result of ``fit``."""
    import ray  # noqa: F401  (a missing [dist] extra fails here, before any work)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    so = cfg.scaleout
    W = int(cfg.trainer.workers)
    # workers run in their own directories: hand them absolute paths of what the driver sees
    if not str(cfg.data.path).startswith("synthetic:") and os.path.exists(str(cfg.data.path)):
        cfg.data.path = os.path.abspath(str(cfg.data.path))
    if str(cfg.trainer.resume):
        cfg.trainer.resume = os.path.abspath(str(cfg.trainer.resume))
    if os.path.exists(str(so.deepspeed.config)):
        so.deepspeed.config = os.path.abspath(str(so.deepspeed.config))
    num_items = _num_items(cfg)
    validate_run(cfg, num_items)
    _init_ray(cfg)
    validate_run(cfg, num_items, ray.cluster_resources().get("CPU", 0.0))
    out_dir = os.path.abspath(str(cfg.output_dir))
    cfg.output_dir = out_dir
    storage = os.path.abspath(str(so.ray.storage_path) or os.path.join(out_dir, "ray"))
    name = str(so.ray.name) or "scalerec"
    os.makedirs(os.path.join(storage, name), exist_ok=True)
    threads = str(int(cfg.trainer.threads) or max(1, int(float(so.ray.cpus_per_worker))))
    env = {"DS_ACCELERATOR": "cpu"} if not so.ray.use_gpu else {}
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "storage": os.path.join(storage, name)},
        torch_config=TorchConfig(backend="nccl" if so.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=W, use_gpu=bool(so.ray.use_gpu),
                                     resources_per_worker={"CPU": float(so.ray.cpus_per_worker)}),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=int(so.ray.max_failures)),
                             checkpoint_config=CheckpointConfig(num_to_keep=int(so.num_to_keep)),
                             worker_runtime_env={"env_vars": env}),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    out = dict(result.return_value or {}) if getattr(result, "return_value", None) is not None else {}
    if not out:  # Ray versions without return_value: the last reported metrics
        m = result.metrics or {}
        out = {"best_epoch": None, "epochs": m.get("epoch"), "global_step": m.get("global_step")}
        final = os.path.join(out_dir, "final.json")
        if os.path.exists(final):
            with open(final) as f:
                out.update(json.load(f))
    out["output_dir"] = out_dir
    out["checkpoint"] = result.checkpoint.path if result.checkpoint is not None else None
    return out
