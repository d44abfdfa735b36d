"""The SparseGrad linear layer (also MeProp's, with identity rotations)."""
from __future__ import annotations

import torch
import torch.nn as nn

from scalerec.ops.sparse_grad import sparse_linear, sparsegrad_rotated_update_


class SparseGradLinear(nn.Module):
    """A linear layer trained through a rotated weight ``W~ = U_outᵀ W U_in`` with top-k sparse gradients.

    The function is exactly the original one, ``y = ((x U_in) W~ᵀ) U_outᵀ + b = x Wᵀ + b``: the forward uses
    the dense weight ``W = U_out W~ U_inᵀ`` kept in a (non-persistent) buffer, so it costs one GEMM like
    ``nn.Linear``. The backward gives ``W~`` a sparse gradient holding the ``k`` largest entries of
    ``U_outᵀ grad_yᵀ x U_in``, the bias its ordinary gradient, and the input its exact gradient.

    After an optimizer changed ``W~`` only at the gradient's entries, :meth:`apply_sparse_delta` brings ``W``
    up to date by a sparse-by-dense product (``SparseGradOptimizer`` calls it). Any other change of ``W~``
    (``load_state_dict``, a dense optimizer, manual edits) is detected through the tensor's version counter and
    ``W`` is re-formed exactly before the next forward.

    With ``u_out = u_in = None`` there is no rotation: ``W~`` is the weight itself (MeProp).
    """

    def __init__(self, linear: nn.Linear, u_out: torch.Tensor | None, u_in: torch.Tensor | None, k: int,
                 refresh_every: int = 100, train_bias: bool = True, use_reference: bool = False,
                 grad_dtype: torch.dtype | None = None):
        super().__init__()
        if (u_out is None) != (u_in is None):
            raise ValueError("SparseGradLinear: pass both u_out and u_in, or neither (MeProp)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.k = int(k)
        self.refresh_every = int(refresh_every)
        self.use_reference = bool(use_reference)
        self.train_bias = bool(train_bias)
        self.grad_dtype = grad_dtype
        w = linear.weight.detach()
        if u_out is not None:
            u_out = u_out.to(device=w.device, dtype=w.dtype)
            u_in = u_in.to(device=w.device, dtype=w.dtype)
            self.register_buffer("u_out", u_out)
            self.register_buffer("u_in", u_in)
            self.rotated_weight = nn.Parameter(u_out.t() @ w @ u_in)
            # the dense forward weight starts as the original weight itself (its storage is taken over, not
            # copied; the replaced nn.Linear must not be used afterwards): the layer is exact before training
            self.register_buffer("w_eff", w, persistent=False)
        else:
            self.u_out = self.u_in = None
            self.rotated_weight = nn.Parameter(w.clone())
            self.w_eff = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=train_bias)
        else:
            self.register_parameter("bias", None)
        self._synced_version = self.rotated_weight._version
        self._updates = 0

    @property
    def rotated(self) -> bool:
        return self.u_out is not None

    def extra_repr(self) -> str:
        kind = "sparsegrad" if self.rotated else "meprop"
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, {kind}, "
                f"bias={self.bias is not None}")

    # ------------------------------------------------------------------ dense weight maintenance
    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """``U_out W~ U_inᵀ``, formed exactly (not the cached buffer)."""
        if not self.rotated:
            return self.rotated_weight.detach().clone()
        return self.u_out @ self.rotated_weight @ self.u_in.t()

    @torch.no_grad()
    def refresh(self) -> None:
        if self.rotated:
            self.w_eff.copy_(self.dense_weight())
        self._synced_version = self.rotated_weight._version

    @torch.no_grad()
    def apply_sparse_delta(self, indices: torch.Tensor, delta: torch.Tensor) -> None:
        """``W~`` changed by ``delta`` at flat ``indices`` (and nowhere else): update the dense weight to match."""
        if self.rotated:
            self._updates += 1
            if self._updates % self.refresh_every == 0:
                self.w_eff.copy_(self.dense_weight())
            else:
                sparsegrad_rotated_update_(self.w_eff, self.u_out, self.u_in, indices, delta.to(self.w_eff.dtype))
        self._synced_version = self.rotated_weight._version

    def _forward_weight(self) -> torch.Tensor:
        if not self.rotated:
            return self.rotated_weight
        if self.rotated_weight._version != self._synced_version:
            self.refresh()
        return self.w_eff

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    # ------------------------------------------------------------------ forward / export
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._forward_weight()
        if not self.rotated_weight.requires_grad or not torch.is_grad_enabled():
            return nn.functional.linear(x, w, self.bias)
        return sparse_linear(x, self.rotated_weight, self.bias, w, self.u_out, self.u_in, self.k, self.use_reference,
                             compute_dtype=self.grad_dtype)

    @torch.no_grad()
    def revert(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W = U_out W~ U_inᵀ`` and the trained bias."""
        w = self.dense_weight()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                        dtype=w.dtype)
        lin.weight.copy_(w)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin
