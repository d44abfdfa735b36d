"""LoRA baseline through the ``peft`` library, on the same MLP linears, with a budget matched to SparseGrad's."""
from __future__ import annotations

from typing import Iterable

import torch.nn as nn

from scalerec.peft.config import find_targets


def matched_lora_rank(model: nn.Module, target_modules: list[str] | None, k_per_layer: dict[str, int] | int | None = None,
                      density: float = 0.01) -> int:
    """LoRA rank whose trainable parameters ``r (in + out)`` per targeted linear best match the ``k`` entries that
    SparseGrad/MeProp update per step (``k = density * in * out`` unless given), averaged over the targets."""
    targets = find_targets(model, target_modules, "LoRA")
    budget, per_rank = 0, 0
    for t, names in targets.items():
        lin = model.get_submodule(names[0])
        if isinstance(k_per_layer, dict):
            k = k_per_layer[t]
        elif isinstance(k_per_layer, int):
            k = k_per_layer
        else:
            k = max(1, round(density * lin.in_features * lin.out_features))
        budget += k * len(names)
        per_rank += (lin.in_features + lin.out_features) * len(names)
    return max(1, round(budget / per_rank))


def apply_lora(model: nn.Module, target_modules: list[str] | None, rank: int, alpha: float | None = None,
               dropout: float = 0.0, modules_to_save: Iterable[str] = (), train_bias: bool = True) -> nn.Module:
    """Wrap ``model`` with a peft LoRA adapter on exactly the targeted linears; returns the ``PeftModel``.

    ``modules_to_save`` (e.g. the classifier head) stay fully trainable; with ``train_bias`` the targeted
    linears' biases are trained too (peft ``bias="lora_only"``), as in SparseGrad.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
    targets = find_targets(model, target_modules, "LoRA")
    names = [n for ns in targets.values() for n in ns]
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                     target_modules=names, modules_to_save=list(modules_to_save) or None,
                     bias="lora_only" if train_bias else "none")
    return get_peft_model(model, cfg)
