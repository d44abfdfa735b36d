"""The loss registry: ``get_loss(name, **params) -> fn(hidden, item_table, targets) -> scalar``.

The one loss signature (docs/architecture.md):

    loss = LOSS(hidden,       # [N, d]  query states at real (non-padding) positions
                item_table,   # [C + 1, d] item embeddings; row 0 is the padding item and never a candidate
                targets,      # [N] positive item ids in 1..C
                **params)

A loss module registers itself with ``@register_loss("name")``: the parameters the loss accepts and their
defaults are read from the function's signature (everything after the first three arguments), so a typo in a
config gives a clear error instead of being ignored.

``item_table`` is a dense ``[C + 1, d]`` tensor (or ``nn.Embedding``) or a row-sharded ``ShardedItemTable``.
For the latter the registry calls the loss's sharded form, registered beside it with
``@register_sharded("name")`` (same parameters); a loss without one runs on a one-rank table through a dense
view and is refused on W > 1 ranks.
"""
from __future__ import annotations

import functools
import importlib
import inspect
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
    sharded: LossFn | None = None


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


def signature_defaults(fn: LossFn) -> dict[str, Any]:
    """The keyword parameters of ``fn(hidden, item_table, targets, ...)`` and their defaults."""
    params = list(inspect.signature(fn).parameters.values())[3:]
    bad = [p.name for p in params if p.default is inspect.Parameter.empty or p.kind is p.VAR_KEYWORD]
    if bad:
        raise TypeError(f"{fn.__qualname__}: every loss parameter needs a default (no **kwargs), got {bad}")
    return {p.name: p.default for p in params}


def register_loss(name: str):
    """Register ``fn(hidden, item_table, targets, **params)`` as loss ``name`` (parameters from its signature)."""
    def deco(fn: LossFn) -> LossFn:
        _REGISTRY[name] = LossSpec(name, fn, signature_defaults(fn), (fn.__doc__ or "").strip())
        return fn

    return deco


def register_sharded(name: str):
    """Register the row-sharded form of loss ``name``: ``fn(hidden, table: ShardedItemTable, targets, **params)``
    with the same parameters as the dense form (checked at registration)."""
    def deco(fn: LossFn) -> LossFn:
        spec = _REGISTRY[name]
        if signature_defaults(fn) != spec.defaults:
            raise TypeError(f"sharded loss {name!r}: parameters {signature_defaults(fn)} differ from the dense form's "
                            f"{spec.defaults}")
        spec.sharded = fn
        return fn

    return deco


def has_sharded_form(name: str) -> bool:
    return _spec(name).sharded is not None


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


def _check_targets(name: str, hidden, targets, num_items: int) -> None:
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"loss {name!r}: targets must be [N]={hidden.shape[0]}, got {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) > num_items):
        raise ValueError(f"loss {name!r}: target ids must lie in 1..{num_items} (0 is padding); "
                         f"got min {int(targets.min())}, max {int(targets.max())}")


def _sharded_call(name: str, params: dict[str, Any], hidden, table, targets) -> torch.Tensor:
    if hidden.dim() != 2 or hidden.size(1) != table.dim:
        raise ValueError(f"loss {name!r}: hidden must be [N, {table.dim}], got {tuple(hidden.shape)}")
    _check_targets(name, hidden, targets, table.num_items)
    spec = _spec(name)
    if spec.sharded is not None:
        return spec.sharded(hidden, table, targets, **params)
    if table.world_size == 1:
        return spec.fn(hidden, table.dense_leaf(), targets, **params)
    raise ValueError(f"loss {name!r} has no row-sharded form; on W > 1 ranks use one of "
                     f"{sorted(n for n, s in _REGISTRY.items() if s.sharded is not None)}")


def _checked_call(fn: LossFn, name: str, params: dict[str, Any], hidden, item_table, targets) -> torch.Tensor:
    if getattr(item_table, "is_sharded_item_table", False):
        return _sharded_call(name, params, hidden, item_table, targets)
    table = item_table.weight if isinstance(item_table, torch.nn.Embedding) else item_table
    if isinstance(table, torch.Tensor):
        if hidden.dim() != 2 or table.dim() != 2 or hidden.size(1) != table.size(1):
            raise ValueError(
                f"loss {name!r}: hidden must be [N, d] and item_table [C+1, d] with the same d; "
                f"got {tuple(hidden.shape)} and {tuple(table.shape)}"
            )
        _check_targets(name, hidden, targets, table.size(0) - 1)
    return fn(hidden, table, targets, **params)


def sample_uniform_negatives(shape, num_items: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform item ids in 1..num_items (never the padding id 0)."""
    return torch.randint(1, num_items + 1, shape, device=device, generator=generator)
