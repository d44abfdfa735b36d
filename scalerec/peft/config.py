"""Configuration dataclasses of the MLP fine-tuning methods (SparseGrad, MeProp) and target-module matching."""
from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

# Default MLP targets per model family: one entry per *layer type* (the rotations are shared within a type).
# Entries are regular expressions matched against the end of a module name on a name boundary, so
# "up_proj" matches "model.layers.3.mlp.up_proj" and r"layer\.\d+\.output\.dense" matches BERT's MLP output
# projection but not "attention.output.dense".
BERT_MLP_TARGETS = ("intermediate.dense", r"layer\.\d+\.output\.dense")
LLAMA_MLP_TARGETS = ("up_proj", "down_proj")
LLAMA_MLP_TARGETS_WITH_GATE = ("gate_proj", "up_proj", "down_proj")


def _check_density_and_k(owner: str, density: float, k: int | None) -> None:
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{owner}.k must be a positive int (entries kept per layer) or None, got {k!r}")
        return
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (0.0 < float(density) <= 1.0):
        raise ValueError(f"{owner}.density must be a float in (0, 1] (fraction of weight entries updated per step), "
                         f"got {density!r}")


# "float32": the parameters' own dtype (exact); "bfloat16": low-precision weight-gradient GEMMs and selection
GRAD_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def _gemm_seconds(dtype: torch.dtype, reps: int = 3) -> float:
    """Seconds of the weight-gradient GEMM's shape on this CPU (a [1024, 1536]ᵀ x [1024, 384] product, MiniLM's MLP
    at half the benchmark's tokens) in ``dtype``, the best of ``reps`` after a warm-up."""
    g = torch.randn(1024, 1536).to(dtype)
    x = torch.randn(1024, 384).to(dtype)
    g.t() @ x
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        g.t() @ x
        best = min(best, time.perf_counter() - t)
    return best


@functools.lru_cache(maxsize=None)
def fast_grad_dtype(device: str = "cpu") -> str:
    """The faster weight-gradient dtype here. On a CPU, timed: "bfloat16" when a bf16 GEMM of the MLP's shape runs
    at least 1.25x faster than float32 (it must also pay for casting x, grad_y and both bases), else "float32". CPU
    flags do not tell: AVX512-BF16 made bf16 2x faster on one machine (2026-11-26) and 1.6x *slower* on another
    (an AVX-512 Xeon, 2026-12-07: 31 vs 20 ms for this product; 0.55x against 0.67x LoRA's speed on SST-2); without
    bf16 instructions torch emulates it, 5-60x slower (an AVX2 EPYC: 203 vs 31 ms). On a GPU "float32": the MLP
    GEMMs of a small model are too small for bf16 to pay for its casts (H100, MiniLM on SST-2, 2026-11-27: 0.77x
    LoRA's speed and 535 MB in float32 against 0.72x and 548 MB in bf16). Measured once per process (~0.1 s)."""
    if str(device).startswith("cuda"):
        return "float32"
    return "bfloat16" if 1.25 * _gemm_seconds(torch.bfloat16) <= _gemm_seconds(torch.float32) else "float32"


def _check_grad_dtype(owner: str, grad_dtype: str) -> None:
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"{owner}.grad_dtype must be one of {sorted(GRAD_DTYPES)}, got {grad_dtype!r}")


def _check_targets(owner: str, target_modules) -> None:
    if target_modules is None:
        return
    if isinstance(target_modules, str) or not all(isinstance(t, str) and t for t in target_modules) \
            or len(target_modules) == 0:
        raise ValueError(f"{owner}.target_modules must be a non-empty list of module-name patterns "
                         f"(e.g. {list(BERT_MLP_TARGETS)} or {list(LLAMA_MLP_TARGETS)}) or None for the model's MLP, "
                         f"got {target_modules!r}")
    for t in target_modules:
        try:
            re.compile(t)
        except re.error as exc:
            raise ValueError(f"{owner}.target_modules entry {t!r} is not a valid pattern: {exc}") from None


@dataclass
class SparseGradConfig:
    """SparseGrad: train the MLP linears in a rotated basis where the gradient is sparse, top-k entries per step.

    target_modules: one pattern per layer type (None: the model's MLP up/down projections, BERT or LLaMA).
    density: fraction of each weight's entries updated per step (default 1%); ``k`` overrides it with a count.
    calibration_steps: batches whose weight gradients are stacked per layer type for the HOSVD.
    train_bias: the bias of each targeted linear is trained with its ordinary gradient.
    grad_dtype: dtype of the weight-gradient GEMMs and the top-k selection: "float32" (the parameters' dtype,
        exact) or "bfloat16"
        (about 2x faster on CPUs with AVX512-BF16/AMX; the selected values carry bfloat16 rounding).
    use_reference: backward through the pure-PyTorch reference instead of the C++ op (for tests).
    """

    target_modules: list[str] | None = None
    density: float = 0.01
    k: int | None = None
    calibration_steps: int = 20
    train_bias: bool = True
    grad_dtype: str = "float32"
    use_reference: bool = False

    def __post_init__(self):
        _check_density_and_k("SparseGradConfig", self.density, self.k)
        _check_grad_dtype("SparseGradConfig", self.grad_dtype)
        _check_targets("SparseGradConfig", self.target_modules)
        if isinstance(self.calibration_steps, bool) or not isinstance(self.calibration_steps, int) \
                or self.calibration_steps < 1:
            raise ValueError(f"SparseGradConfig.calibration_steps must be an int >= 1, got {self.calibration_steps!r}")
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)

    def k_for(self, out_features: int, in_features: int) -> int:
        n = out_features * in_features
        if self.k is not None:
            return min(self.k, n)
        return max(1, min(n, int(round(self.density * n))))


@dataclass
class MePropConfig:
    """MeProp baseline: top-k of each MLP weight gradient in the original basis (no rotation, no calibration)."""

    target_modules: list[str] | None = None
    density: float = 0.01
    k: int | None = None
    train_bias: bool = True
    grad_dtype: str = "float32"
    use_reference: bool = False

    def __post_init__(self):
        _check_density_and_k("MePropConfig", self.density, self.k)
        _check_grad_dtype("MePropConfig", self.grad_dtype)
        _check_targets("MePropConfig", self.target_modules)
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)

    k_for = SparseGradConfig.k_for


def _pattern_matches(pattern: str, name: str) -> bool:
    return re.search(r"(?:^|\.)(?:" + pattern + r")$", name) is not None


def default_mlp_targets(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if any(_pattern_matches(BERT_MLP_TARGETS[0], n) for n in names):
        return list(BERT_MLP_TARGETS)
    if any(_pattern_matches("up_proj", n) for n in names):
        return list(LLAMA_MLP_TARGETS)
    raise ValueError("target_modules=None: no BERT (intermediate.dense) or LLaMA (up_proj) MLP linears found; "
                     "pass target_modules explicitly")


def find_targets(model: nn.Module, target_modules: list[str] | None, owner: str = "config") -> dict[str, list[str]]:
    """Map each target pattern (layer type) to the names of the nn.Linear modules it matches, in model order.

    Raises ValueError naming the pattern when one matches no nn.Linear, or when a module matches two patterns,
    or when the modules of one type differ in shape (their rotations are shared).
    """
    patterns = list(target_modules) if target_modules is not None else default_mlp_targets(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out: dict[str, list[str]] = {}
    owner_of: dict[str, str] = {}
    for p in patterns:
        hits = [n for n in linears if _pattern_matches(p, n)]
        if not hits:
            sample = ", ".join(list(linears)[:6])
            raise ValueError(f"{owner}.target_modules: {p!r} matches no nn.Linear module in the model "
                             f"(linear modules are named like: {sample}, ...)")
        for n in hits:
            if n in owner_of:
                raise ValueError(f"{owner}.target_modules: module {n!r} matches both {owner_of[n]!r} and {p!r}")
            owner_of[n] = p
        shapes = {tuple(linears[n].weight.shape) for n in hits}
        if len(shapes) != 1:
            raise ValueError(f"{owner}.target_modules: {p!r} matches linears of different shapes {sorted(shapes)}; "
                             f"a layer type must have one shape (split it into several patterns)")
        out[p] = hits
    return out


__all__ = ["SparseGradConfig", "MePropConfig", "find_targets", "default_mlp_targets",
           "BERT_MLP_TARGETS", "LLAMA_MLP_TARGETS", "LLAMA_MLP_TARGETS_WITH_GATE"]
