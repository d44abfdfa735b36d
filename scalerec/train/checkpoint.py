"""Checkpoints: model, optimizer, epoch, RNG states, config, item-id mapping and dataset fingerprint."""
from __future__ import annotations

import os
import random

import numpy as np
import torch
from omegaconf import OmegaConf

from scalerec.models import SASRec


def save_checkpoint(path: str, *, model, optimizer, epoch: int, cfg, dataset, metrics: dict, extra=None) -> None:
    payload = {
        "format": "scalerec-checkpoint-v1",
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": epoch,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "item_ids": np.asarray(dataset.item_ids),
        "num_items": dataset.num_items,
        "dataset_fingerprint": dataset.fingerprint,
        "metrics": metrics,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        **(extra or {}),
    }
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint


def read_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != "scalerec-checkpoint-v1":
        raise ValueError(f"{path}: not a scalerec checkpoint")
    return payload


def build_model(cfg, num_items: int) -> SASRec:
    m = cfg.model if hasattr(cfg, "model") else cfg["model"]
    get = (lambda k: m[k])
    return SASRec(num_items, maxlen=int(get("maxlen")), hidden=int(get("hidden")), num_blocks=int(get("num_blocks")),
                  num_heads=int(get("num_heads")), dropout=float(get("dropout")))


def load_checkpoint(path: str):
    """Returns ``(model, cfg, payload)`` with the model's weights loaded (eval mode)."""
    payload = read_checkpoint(path)
    cfg = OmegaConf.create(payload["config"])
    model = build_model(cfg, int(payload["num_items"]))
    model.load_state_dict(payload["model"])
    model.eval()
    return model, cfg, payload


def check_same_dataset(payload: dict, dataset, path: str) -> None:
    if payload["dataset_fingerprint"] != dataset.fingerprint:
        raise ValueError(
            f"{path}: checkpoint was trained on another dataset (fingerprint {payload['dataset_fingerprint']}, "
            f"{payload['num_items']} items) than {dataset.name} (fingerprint {dataset.fingerprint}, "
            f"{dataset.num_items} items)"
        )
