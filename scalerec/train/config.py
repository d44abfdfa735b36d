"""Run configuration: defaults, YAML + ``key=value`` overrides (omegaconf), validation with clear errors."""
from __future__ import annotations

import os
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

DEFAULTS: dict[str, Any] = {
    "data": {
        "path": "data/beauty/Beauty.txt",
        "format": "auto",  # auto | user_seq | user_item | movielens | csv | parquet
        "split": "loo",  # loo | temporal
        "min_item_count": 0,
        "min_user_count": 0,
        "temporal_quantile": 0.95,
    },
    "model": {"maxlen": 200, "hidden": 64, "num_blocks": 2, "num_heads": 1, "dropout": 0.3},
    "loss": {"name": "ce", "params": {}},
    "trainer": {
        "epochs": 200,
        "batch_size": 128,
        "lr": 1e-3,
        "betas": [0.9, 0.98],
        "weight_decay": 0.0,
        "patience": 10,
        "seed": 42,
        "threads": 0,  # per process / worker; 0: torch's default in-process, cpus_per_worker on Ray
        "max_steps_per_epoch": 0,  # 0: whole epoch
        "eval_every": 1,
        "time_budget_s": 0,  # 0: no limit; otherwise stop after the epoch that crosses it
        "workers": 1,  # >1: Ray Train over that many workers (scale-out)
        "engine": "auto",  # auto | adam (one process) | deepspeed (ZeRO, scaleout.deepspeed); auto: W > 1 -> deepspeed
        "progress": True,
        "resume": "",  # a checkpoint directory to continue from (OUTPUT_DIR/checkpoint)
    },
    "eval": {"ks": [1, 5, 10, 20, 50], "batch_size": 512, "valid_max_cases": 0},
    "output_dir": "runs/default",
}


from scalerec.train.scaleout_defaults import SCALEOUT_DEFAULTS  # noqa: E402  (plain dict, imports nothing heavy)

DEFAULTS.update(SCALEOUT_DEFAULTS)


class ConfigError(ValueError):
    pass


def load_config(path: str | None = None, overrides: Sequence[str] = (), extra_defaults: dict | None = None) -> DictConfig:
    """Defaults (plus ``extra_defaults``, e.g. the scale-out section), then the YAML file, then ``key=value``."""
    base = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.create(extra_defaults or {}))
    OmegaConf.set_struct(base, True)
    # loss params are free-form here; the loss itself rejects unknown names
    OmegaConf.set_struct(base.loss, False)
    layers = []
    if path is not None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as exc:
            raise ConfigError(f"{path}: cannot parse YAML: {exc}") from None
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key=value (e.g. trainer.epochs=5)")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.merge(base, *layers)
    except (ConfigKeyError, OmegaConfBaseException) as exc:
        raise ConfigError(f"{path or 'config'}: {exc}".splitlines()[0]) from None
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    from scalerec.losses import available_losses

    def positive(key: str) -> None:
        v = OmegaConf.select(cfg, key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{key} must be a positive number, got {v!r}")

    for key in ("model.maxlen", "model.hidden", "model.num_blocks", "model.num_heads", "trainer.epochs",
                "trainer.batch_size", "trainer.lr", "eval.batch_size", "trainer.workers"):
        positive(key)
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout must lie in [0, 1), got {cfg.model.dropout}")
    if cfg.data.split not in ("loo", "temporal"):
        raise ConfigError(f"data.split must be 'loo' or 'temporal', got {cfg.data.split!r}")
    if cfg.loss.name not in available_losses():
        raise ConfigError(f"loss.name {cfg.loss.name!r} is unknown; allowed values: {', '.join(available_losses())}")
    if cfg.trainer.patience < 0:
        raise ConfigError(f"trainer.patience must be >= 0, got {cfg.trainer.patience}")
    if not cfg.eval.ks or any(int(k) <= 0 for k in cfg.eval.ks):
        raise ConfigError(f"eval.ks must be a non-empty list of positive integers, got {list(cfg.eval.ks)}")


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
