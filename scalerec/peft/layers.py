"""The SparseGrad linear layer (also MeProp's, with identity rotations)."""
from __future__ import annotations

import torch
import torch.nn as nn

from scalerec.ops.sparse_grad import sparse_linear, sparsegrad_rotated_update_


class SparseGradLinear(nn.Module):
    """A linear layer trained through a rotated weight ``W~ = U_outᵀ W U_in`` with top-k sparse gradients.

    The layer stores the dense weight ``W`` only (the parameter ``weight``, as ``nn.Linear`` does) plus the frozen
    bases ``U_out``, ``U_in`` shared by its layer type; ``W~`` is never stored (:attr:`rotated_weight` computes it).
    The forward is ``nn.Linear``'s, one GEMM, and exactly the original function. The backward gives:

    * the input its exact gradient and the bias its ordinary gradient;
    * ``weight`` a sparse (COO) gradient **in the rotated basis**: the ``k`` largest entries of
      ``U_outᵀ grad_yᵀ x U_in``, i.e. the gradient with respect to ``W~``.

    :class:`~scalerec.peft.sparsegrad.SparseGradOptimizer` applies that gradient: lazy Adam on the ``k`` rotated
    entries gives a sparse change ``D`` of ``W~``, and :meth:`apply_sparse_delta` adds ``U_out D U_inᵀ`` to ``W``
    (a sparse-by-dense product). A plain optimizer would add the rotated-basis gradient to ``W`` as if it were in
    the original basis, so a rotated layer refuses to run after its weight was changed in place by anything
    else (see :meth:`accept_weight_change`); ``load_state_dict`` and ``.to()`` are fine.

    With ``u_out = u_in = None`` there is no rotation (MeProp): the gradient is the top-k of the ordinary weight
    gradient, and any optimizer may apply it.
    """

    def __init__(self, linear: nn.Linear, u_out: torch.Tensor | None, u_in: torch.Tensor | None, k: int,
                 train_bias: bool = True, use_reference: bool = False, grad_dtype: torch.dtype | None = None):
        super().__init__()
        if (u_out is None) != (u_in is None):
            raise ValueError("SparseGradLinear: pass both u_out and u_in, or neither (MeProp)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.k = int(k)
        self.use_reference = bool(use_reference)
        self.train_bias = bool(train_bias)
        self.grad_dtype = grad_dtype
        w = linear.weight.detach()
        if u_out is not None:
            self.register_buffer("u_out", u_out.to(device=w.device, dtype=w.dtype))
            self.register_buffer("u_in", u_in.to(device=w.device, dtype=w.dtype))
        else:
            self.u_out = self.u_in = None
        # the weight's storage is taken over, not copied (the replaced nn.Linear must not be used afterwards)
        self.weight = nn.Parameter(w)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=train_bias)
        else:
            self.register_parameter("bias", None)
        self.accept_weight_change()

    @property
    def rotated(self) -> bool:
        return self.u_out is not None

    def extra_repr(self) -> str:
        kind = "sparsegrad" if self.rotated else "meprop"
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, {kind}, "
                f"bias={self.bias is not None}")

    @property
    def rotated_weight(self) -> torch.Tensor:
        """``W~ = U_outᵀ W U_in``, formed on demand (a detached copy; ``W`` itself for MeProp, detached)."""
        with torch.no_grad():
            if not self.rotated:
                return self.weight.detach()
            return self.u_out.t() @ self.weight @ self.u_in

    # ------------------------------------------------------------------ weight updates
    def _weight_key(self) -> tuple[int, int]:
        return self.weight.data_ptr(), self.weight._version

    def accept_weight_change(self) -> None:
        """Declare the current ``weight`` valid. Call it after changing a rotated layer's weight in place on
        purpose (not through :class:`SparseGradOptimizer`); otherwise the next forward raises."""
        self._seen = self._weight_key()

    @torch.no_grad()
    def apply_sparse_delta(self, indices: torch.Tensor, delta: torch.Tensor) -> None:
        """``W~`` changes by ``delta`` at the flat ``indices`` (and nowhere else): ``W += U_out D U_inᵀ``."""
        if self.rotated:
            sparsegrad_rotated_update_(self.weight, self.u_out, self.u_in, indices, delta.to(self.weight.dtype))
        else:
            self.weight.view(-1).index_add_(0, indices, delta.to(self.weight.dtype))
        self.accept_weight_change()

    def _check_weight(self) -> None:
        key = self._weight_key()
        if key == self._seen:
            return
        if key[0] != self._seen[0]:  # new storage: .to(), .half(), param.data = ...: a re-placement, not an update
            self._seen = key
            return
        raise RuntimeError(
            "SparseGradLinear: the weight was changed in place outside SparseGradOptimizer. Its gradient is given "
            "in the rotated basis (U_outᵀ G U_in), so a plain optimizer (torch.optim.SGD, ...) applies it wrongly; "
            "train SparseGrad layers with scalerec.peft.SparseGradOptimizer. After an intentional edit of the "
            "weight, call layer.accept_weight_change().")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        legacy = prefix + "rotated_weight"  # checkpoints of the earlier layout stored W~, not W
        if legacy in state_dict and prefix + "weight" not in state_dict:
            w_rot = state_dict.pop(legacy)
            uo = state_dict.get(prefix + "u_out", self.u_out)
            ui = state_dict.get(prefix + "u_in", self.u_in)
            state_dict[prefix + "weight"] = w_rot if uo is None else uo @ w_rot.to(uo.dtype) @ ui.t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.accept_weight_change()

    # ------------------------------------------------------------------ forward / export
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotated:
            self._check_weight()
        if not self.weight.requires_grad or not torch.is_grad_enabled():
            return nn.functional.linear(x, self.weight, self.bias)
        return sparse_linear(x, self.weight, self.bias, self.u_out, self.u_in, self.k, self.use_reference,
                             compute_dtype=self.grad_dtype)

    @torch.no_grad()
    def revert(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the trained weight and bias (copies)."""
        w = self.weight
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                        dtype=w.dtype)
        lin.weight.copy_(w)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin
