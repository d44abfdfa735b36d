"""Loads the compiled extension ``scalerec._C`` once; every op module imports this first."""
from __future__ import annotations

import importlib

_loaded = False


def load_extension() -> None:
    """Import ``scalerec._C`` (registers the ``torch.ops.scalerec`` operators) or fail with a clear message."""
    global _loaded
    if _loaded:
        return
    try:
        importlib.import_module("scalerec._C")
    except ImportError as exc:  # pragma: no cover - only on a broken install
        raise ImportError(
            "scalerec: the C++ extension scalerec._C is not built. Run `make install` "
            "(or `pip install --no-build-isolation -e .`) in the repository root."
        ) from exc
    _loaded = True


def has_cuda_kernels() -> bool:
    import torch

    load_extension()
    return torch._C._dispatch_has_kernel_for_dispatch_key("scalerec::gather_dot", "CUDA")


def hidden_table_grads(ctx, grad_h, grad_t, n_inputs: int) -> tuple:
    """The autograd return of an op whose first two inputs are ``hidden`` and ``table`` (the rest get None)."""
    return (grad_h if ctx.needs_input_grad[0] else None, grad_t if ctx.needs_input_grad[1] else None) + (None,) * (
        n_inputs - 2
    )
