"""The loss registry: ``get_loss(name, **params) -> fn(hidden, item_table, targets) -> scalar``.

The one loss signature (DESIGN.md):

    loss = LOSS(hidden,       # [N, d]  query states at real (non-padding) positions
                item_table,   # [C + 1, d] item embeddings; row 0 is the padding item and never a candidate
                targets,      # [N] positive item ids in 1..C
                **params)

A loss module registers itself with ``@register_loss("name", defaults={...})``; the defaults dict lists
every parameter the loss accepts, so a typo in a config gives a clear error instead of being ignored.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

LossFn = Callable[..., torch.Tensor]


@dataclass
class LossSpec:
    name: str
    fn: LossFn
    defaults: dict[str, Any]
    doc: str


_REGISTRY: dict[str, LossSpec] = {}

# Modules that define losses; imported lazily so `get_loss` sees every loss without import cycles.
_LOSS_MODULES = [
    "scalerec.losses.ce",
    "scalerec.losses.ce_sampled",
    "scalerec.losses.bce",
    "scalerec.losses.gbce",
    "scalerec.losses.sce",
    "scalerec.losses.sce_faiss",
    "scalerec.losses.rece",
]
_imported = False


def register_loss(name: str, defaults: dict[str, Any] | None = None):
    def deco(fn: LossFn) -> LossFn:
        _REGISTRY[name] = LossSpec(name, fn, dict(defaults or {}), (fn.__doc__ or "").strip())
        return fn

    return deco


def _import_all() -> None:
    global _imported
    if _imported:
        return
    for mod in _LOSS_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:  # a real import error inside an existing module
                raise
    _imported = True


def available_losses() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def loss_defaults(name: str) -> dict[str, Any]:
    return dict(_spec(name).defaults)


def _spec(name: str) -> LossSpec:
    _import_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; allowed values: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_loss(name: str, **params: Any) -> Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor]:
    """Return ``fn(hidden, item_table, targets) -> scalar loss`` with ``params`` bound.

    Unknown parameters raise ``ValueError`` naming the parameter and the ones the loss accepts.
    """
    spec = _spec(name)
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        allowed = ", ".join(sorted(spec.defaults)) or "(none)"
        raise ValueError(f"loss {name!r} got unknown parameter(s) {unknown}; allowed: {allowed}")
    bound = {**spec.defaults, **params}
    fn = functools.partial(_checked_call, spec.fn, name, bound)
    fn.name = name  # type: ignore[attr-defined]
    fn.params = bound  # type: ignore[attr-defined]
    return fn


def _checked_call(fn: LossFn, name: str, params: dict[str, Any], hidden, item_table, targets) -> torch.Tensor:
    if getattr(item_table, "is_sharded_item_table", False):  # row-sharded table: scalerec/losses/distributed.py
        return item_table.dispatch_loss(name, fn, params, hidden, targets)
    table = item_table.weight if isinstance(item_table, torch.nn.Embedding) else item_table
    if isinstance(table, torch.Tensor):
        if hidden.dim() != 2 or table.dim() != 2 or hidden.size(1) != table.size(1):
            raise ValueError(
                f"loss {name!r}: hidden must be [N, d] and item_table [C+1, d] with the same d; "
                f"got {tuple(hidden.shape)} and {tuple(table.shape)}"
            )
        if targets.shape != hidden.shape[:1]:
            raise ValueError(f"loss {name!r}: targets must be [N]={hidden.shape[0]}, got {tuple(targets.shape)}")
        if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) >= table.size(0)):
            raise ValueError(
                f"loss {name!r}: target ids must lie in 1..{table.size(0) - 1} (0 is padding); "
                f"got min {int(targets.min())}, max {int(targets.max())}"
            )
    return fn(hidden, table, targets, **params)


def sample_uniform_negatives(shape, num_items: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform item ids in 1..num_items (never the padding id 0)."""
    return torch.randint(1, num_items + 1, shape, device=device, generator=generator)
