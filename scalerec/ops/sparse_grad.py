"""SparseGrad ops: the rotated top-k weight gradient and the sparse-by-dense update of the forward weight.

``sparsegrad_topk_grad(grad_out, x, u_out, u_in, k)`` returns the ``k`` largest-magnitude entries of the
rotated weight gradient ``G~ = U_outᵀ (grad_outᵀ x) U_in`` as (flat indices sorted ascending, values): the
backward of a SparseGrad linear layer (with ``u_out = u_in = None`` it is MeProp's top-k in the original
basis). ``sparsegrad_rotated_update_(weight, u_out, u_in, indices, delta)`` adds ``U_out D U_inᵀ`` to
``weight`` in place, ``D`` being the sparse matrix with ``D.flat[indices] = delta``: it keeps the dense
forward weight ``W = U_out W~ U_inᵀ`` in step with a sparse change of ``W~`` without re-forming it.

``sparse_linear`` is the differentiable face: ``y = x Wᵀ + b`` whose backward returns an exact input
gradient, the ordinary bias gradient and, for ``W``, a sparse (COO) gradient in the rotated basis: the top-k
entries of the gradient with respect to ``W~ = U_outᵀ W U_in``. Each op has a pure-PyTorch reference
(``*_reference``) that the tests compare against.
"""
from __future__ import annotations

import functools
import weakref

import torch

from scalerec.ops._lib import load_extension

load_extension()


# --------------------------------------------------------------------------- fake (meta) kernels
@torch.library.register_fake("scalerec::sparsegrad_topk_grad")
def _topk_grad_fake(grad_out, x, u_out, u_in, k):
    torch._check(grad_out.dim() == 2 and x.dim() == 2)
    torch._check(1 <= k <= grad_out.shape[1] * x.shape[1])
    return x.new_empty((k,), dtype=torch.long), x.new_empty((k,))


@torch.library.register_fake("scalerec::sparsegrad_topk_grad_coo")
def _topk_grad_coo_fake(grad_out, x, u_out, u_in, k):
    torch._check(grad_out.dim() == 2 and x.dim() == 2)
    n = grad_out.shape[1] * x.shape[1]
    torch._check(1 <= k <= n)
    return (x.new_empty((3, k), dtype=torch.long), x.new_empty((k,), dtype=compact_key_dtype(n)), x.new_empty((k,)))


@torch.library.register_fake("scalerec::sparsegrad_rotated_update_")
def _rotated_update_fake(weight, u_out, u_in, indices, delta):
    torch._check(weight.dim() == 2 and indices.dim() == 1 and delta.dim() == 1)
    return None


@torch.library.register_fake("scalerec::sparsegrad_lazy_adam_")
def _lazy_adam_fake(weights, exp_avg, exp_avg_sq, steps, positions, indices, values, u_out, u_in, lr, beta1, beta2,
                    eps):
    torch._check(len(weights) == len(values))
    return None


@torch.library.register_fake("scalerec::sparsegrad_adam_entries_")
def _adam_entries_fake(exp_avg, exp_avg_sq, steps, positions, values, lr, beta1, beta2, eps):
    torch._check(positions.dim() == 1 and values.dim() == 1)
    return torch.empty_like(values)


@torch.library.register_fake("scalerec::sparsegrad_compact_merge")
def _compact_merge_fake(words, exp_avg, exp_avg_sq, steps, keys, n):
    torch._check(words.dim() == 1 and keys.dim() == 1)
    return (torch.empty_like(words), torch.empty_like(exp_avg), torch.empty_like(exp_avg_sq), torch.empty_like(steps),
            keys.new_empty(keys.shape, dtype=torch.long), keys.new_empty((), dtype=torch.long))


# --------------------------------------------------------------------------- python faces
def sparsegrad_topk_grad(grad_out: torch.Tensor, x: torch.Tensor, u_out: torch.Tensor | None,
                         u_in: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` entries (by magnitude) of ``U_outᵀ grad_outᵀ x U_in``: (flat indices ascending, values)."""
    return torch.ops.scalerec.sparsegrad_topk_grad(grad_out, x, u_out, u_in, int(k))


def compact_key_dtype(n: int) -> torch.dtype:
    """The dtype of the keys (flat entry ids) that the backward hands to the optimizer's compact merge for a weight
    with ``n`` entries: int32 where they fit."""
    return torch.int32 if n < 2**31 else torch.long


def sparsegrad_topk_grad_coo(grad_out: torch.Tensor, x: torch.Tensor, u_out: torch.Tensor | None,
                             u_in: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The selection of :func:`sparsegrad_topk_grad` in the forms its users need, from one call: ``indices``
    [3, k] int64 (rows, columns, flat ids; ``indices[:2]`` is a coalesced COO index), ``keys`` [k] (the flat ids as
    int32 when the weight has fewer than 2^31 entries, else int64: the optimizer's compact-state ids) and
    ``values`` [k]. On a GPU the selection kernel writes all of them, where deriving them launched three kernels."""
    return torch.ops.scalerec.sparsegrad_topk_grad_coo(grad_out, x, u_out, u_in, int(k))


def sparsegrad_rotated_update_(weight: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor,
                               indices: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """In place ``weight += U_out D U_inᵀ`` with ``D.flat[indices] = delta`` (sparse); returns ``weight``."""
    torch.ops.scalerec.sparsegrad_rotated_update_(weight, u_out, u_in, indices, delta)
    return weight


def sparsegrad_lazy_adam_(weights, exp_avg, exp_avg_sq, steps, positions, indices, values, u_out, u_in,
                          lr: float, beta1: float, beta2: float, eps: float) -> None:
    """Lazy Adam over the selected entries of several weights in ONE operator call: per weight one element-wise
    kernel (:func:`sparsegrad_adam_entries_`) and the rotated update, ~5 kernel launches instead of the ~29 that the
    Python loop of :func:`sparsegrad_lazy_adam_reference` issues (on a GPU that loop is host-bound).

    Per weight ``i``: the entries ``indices[i]`` (flat, into the weight; gradient ``values[i]``) keep their Adam
    state at ``positions[i]`` of the flat ``exp_avg[i]``, ``exp_avg_sq[i]`` and per-entry step counts ``steps[i]``
    (all updated in place); the weight changes by ``U_out D U_inᵀ`` with ``D.flat[indices] = delta`` when
    ``u_out[i]``/``u_in[i]`` are given, else by ``delta`` at ``indices`` (MeProp)."""
    torch.ops.scalerec.sparsegrad_lazy_adam_(list(weights), list(exp_avg), list(exp_avg_sq), list(steps),
                                             list(positions), list(indices), list(values), list(u_out), list(u_in),
                                             float(lr), float(beta1), float(beta2), float(eps))


def sparsegrad_adam_entries_(exp_avg, exp_avg_sq, steps, positions, values, lr: float, beta1: float, beta2: float,
                             eps: float) -> torch.Tensor:
    """The element-wise part of the lazy-Adam step of one weight in one kernel: the flat state (``exp_avg``,
    ``exp_avg_sq``, int32 or int16 per-entry ``steps``, which stop at their dtype's maximum: see
    :func:`step_count_dtype`) is updated in place at the (distinct) ``positions`` from the gradient ``values``;
    returns each entry's change ``-lr m^ / (sqrt(v^) + eps)``."""
    return torch.ops.scalerec.sparsegrad_adam_entries_(exp_avg, exp_avg_sq, steps, positions, values, float(lr),
                                                       float(beta1), float(beta2), float(eps))


def sparsegrad_compact_merge(words, exp_avg, exp_avg_sq, steps, keys, n: int):
    """Merge one step's selected entries ``keys`` (flat ids, strictly ascending, in ``[0, n)``) into the compact
    lazy-Adam state of a weight with ``n`` entries: ``words`` (int64, ``ceil(n / 64)``) is the bitmap of the entries
    selected so far (bit ``id % 64`` of ``words[id // 64]``), and the moments ``exp_avg``, ``exp_avg_sq`` and step
    counts ``steps`` (int32 or int16) of those entries fill slots ``[0, count)`` of buffers of fixed capacity ``C``
    in ascending id order (an entry's slot is its rank in the bitmap), zeros after. New entries enter with zero
    state; returns the merged ``(words, exp_avg, exp_avg_sq, steps)`` (new tensors, capacity ``C``), each key's slot
    (int64) and the merged ``count`` (a 0-dim int64 tensor on the state's device). The caller leaves room for the
    new entries (an error on the CPU, a device assert on CUDA otherwise). No host sync on a GPU: four kernels and
    a prefix sum."""
    return torch.ops.scalerec.sparsegrad_compact_merge(words, exp_avg, exp_avg_sq, steps, keys, n)


def compact_words(ids: torch.Tensor, n: int) -> torch.Tensor:
    """The bitmap (int64 words, ``ceil(n / 64)``) of the distinct flat ids ``ids`` in ``[0, n)``: the entry set of a
    compact lazy-Adam state (:func:`sparsegrad_compact_merge`)."""
    ids = ids.long().reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise ValueError(f"compact_words: ids must be in [0, {n}), got [{int(ids.min())}, {int(ids.max())}]")
    mask = torch.zeros(-(-n // 64) * 64, dtype=torch.bool, device=ids.device)
    mask[ids] = True
    return _pack_bits(mask)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    # bit b of word w = mask[64 w + b]; the sum of distinct powers of two is their OR (1 << 63 wraps to int64's sign)
    shifts = torch.arange(64, dtype=torch.long, device=mask.device)
    return (mask.view(-1, 64).long() << shifts).sum(1)


def compact_entry_ids(words: torch.Tensor, n: int) -> torch.Tensor:
    """The flat ids (ascending, int64) in a compact state's bitmap ``words``: slot ``i`` of its buffers holds the
    state of entry ``compact_entry_ids(words, n)[i]``."""
    return _unpack_bits(words)[:n].nonzero().squeeze(1)


def _unpack_bits(words: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(64, dtype=torch.long, device=words.device)
    return ((words.unsqueeze(1) >> shifts) & 1).bool().reshape(-1)  # >> is arithmetic; & 1 keeps the one bit


@functools.lru_cache(maxsize=64)  # called per weight and optimizer step (a host-bound path on a GPU)
def step_count_dtype(beta1: float, beta2: float, dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The narrowest exact dtype of lazy Adam's per-entry step counts for moments of ``dtype``: int16 when a
    count that stops at 32767 gives the same bias corrections as the true count, else int32.

    The kernels compute ``1 - beta^t`` in float64 and round it to the arithmetic type (float32 for float32, float16
    and bfloat16 moments; float64 for float64). Once ``beta^32767`` is far below half an ulp of 1 in that type,
    ``1 - beta^t`` rounds to exactly 1 for every ``t >= 32767``, so a saturated 16-bit count changes nothing (the
    margin here is 4x). In float32 that holds for ``beta2 <= ~0.9994`` (Adam's 0.999: ``0.999^32767 ≈ 6e-15``);
    ``beta2 = 0.9999`` keeps int32. Saves 2 of the compact state's 16 bytes per entry."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tiny = torch.finfo(acc).eps / 16  # half an ulp below 1 is eps / 4; 4x margin on top
    top = torch.iinfo(torch.int16).max
    if all(0.0 <= b < 1.0 and b ** top < tiny for b in (beta1, beta2)):
        return torch.int16
    return torch.int32


def _saturating_increment(t: torch.Tensor) -> torch.Tensor:
    top = torch.iinfo(t.dtype).max
    return torch.where(t < top, t + 1, t)


# --------------------------------------------------------------------------- references
def sparsegrad_compact_merge_reference(words, exp_avg, exp_avg_sq, steps, keys, n):
    """Pure-PyTorch reference of :func:`sparsegrad_compact_merge`: the bitmap unpacked to a mask, the old entries'
    new slots by a search of their ids in the merged ids."""
    if words.dtype != torch.long or words.numel() != -(-n // 64):
        raise RuntimeError(f"sparsegrad_compact_merge: words must hold ceil(n / 64) = {-(-n // 64)} int64 words for "
                           f"n = {n}, got {words.numel()} {words.dtype}")
    k, C = keys.numel(), exp_avg.numel()
    keys = keys.long()
    if k and (int(keys.min()) < 0 or int(keys.max()) >= n):
        raise RuntimeError(f"sparsegrad_compact_merge: keys must be in [0, {n})")
    if k > 1 and not bool((keys[1:] > keys[:-1]).all()):
        raise RuntimeError("sparsegrad_compact_merge: keys must be strictly ascending")
    mask = _unpack_bits(words)
    if bool(mask[n:].any()):
        raise RuntimeError(f"sparsegrad_compact_merge: words has bits set at or beyond n = {n}")
    old_ids = mask.nonzero().squeeze(1)
    if old_ids.numel() > C:
        raise RuntimeError(f"sparsegrad_compact_merge: words holds more entries than the buffers ({C})")
    merged = mask.clone()
    merged[keys] = True
    ids = merged.nonzero().squeeze(1)
    if ids.numel() > C:
        raise RuntimeError(f"sparsegrad_compact_merge: the entry set is full (capacity {C}); make room first")
    dest = torch.searchsorted(ids, old_ids)

    def moved(x):
        out = torch.zeros_like(x)
        out[dest] = x[:old_ids.numel()]
        return out

    return (_pack_bits(merged), moved(exp_avg), moved(exp_avg_sq), moved(steps), torch.searchsorted(ids, keys),
            torch.tensor(ids.numel(), dtype=torch.long, device=words.device))


def sparsegrad_adam_entries_reference(exp_avg, exp_avg_sq, steps, positions, values, lr, beta1, beta2, eps):
    """Pure-PyTorch reference of :func:`sparsegrad_adam_entries_`: like the kernel, half types are computed in
    float32 and rounded once, and the bias corrections in float64."""
    acc = torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else values.dtype
    g = values.to(acc)
    t = _saturating_increment(steps[positions])
    m = exp_avg[positions].to(acc) * beta1 + (1 - beta1) * g
    v = exp_avg_sq[positions].to(acc) * beta2 + (1 - beta2) * g * g
    exp_avg[positions], exp_avg_sq[positions], steps[positions] = m.to(values.dtype), v.to(values.dtype), t
    bc1 = (1 - beta1 ** t.double()).to(acc)
    bc2 = (1 - beta2 ** t.double()).to(acc)
    return ((m / bc1) * -lr / ((v / bc2).sqrt() + eps)).to(values.dtype)



def rotated_weight_grad_reference(grad_out, x, u_out=None, u_in=None):
    g = grad_out.t() @ x
    if u_out is not None:
        g = u_out.t() @ g
    if u_in is not None:
        g = g @ u_in
    return g


def sparsegrad_topk_grad_reference(grad_out, x, u_out, u_in, k):
    """Pure-PyTorch reference: dense rotated gradient, ``torch.topk`` of its magnitudes, indices sorted."""
    g = rotated_weight_grad_reference(grad_out, x, u_out, u_in).flatten()
    idx = torch.topk(g.abs(), int(k), sorted=False).indices.sort().values
    return idx, g[idx]


def sparsegrad_topk_grad_coo_reference(grad_out, x, u_out, u_in, k):
    """Pure-PyTorch reference of :func:`sparsegrad_topk_grad_coo`."""
    idx, val = sparsegrad_topk_grad_reference(grad_out, x, u_out, u_in, k)
    cols = x.shape[1]
    return torch.stack([idx // cols, idx % cols, idx]), idx.to(compact_key_dtype(grad_out.shape[1] * cols)), val


def sparsegrad_rotated_update_reference(weight, u_out, u_in, indices, delta):
    d = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
    d.index_add_(0, indices, delta)
    weight.add_(u_out @ d.view_as(weight) @ u_in.t())
    return weight


def sparsegrad_lazy_adam_reference(weights, exp_avg, exp_avg_sq, steps, positions, indices, values, u_out, u_in,
                                   lr: float, beta1: float, beta2: float, eps: float) -> None:
    """Pure-PyTorch reference of :func:`sparsegrad_lazy_adam_`: the Adam arithmetic of all weights as
    ``torch._foreach_*`` calls, the bias corrections computed in float64 as in the operator's kernel (so the two
    agree to rounding); half-precision values go through :func:`sparsegrad_adam_entries_reference` per weight,
    which computes in float32 and rounds once, as the kernel does (in bfloat16 itself, ``1 - 0.999`` rounds to 0).
    The rotated update itself is :func:`sparsegrad_rotated_update_` (tested against its own reference)."""
    if not weights:
        return
    if any(g.dtype in (torch.float16, torch.bfloat16) for g in values):
        delta = [sparsegrad_adam_entries_reference(m, v, t, p, g, lr, beta1, beta2, eps)
                 for m, v, t, p, g in zip(exp_avg, exp_avg_sq, steps, positions, values)]
    else:
        ms = [m[p] for m, p in zip(exp_avg, positions)]
        vs = [v[p] for v, p in zip(exp_avg_sq, positions)]
        ts = [_saturating_increment(t[p]) for t, p in zip(steps, positions)]
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, list(values), alpha=1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, list(values), list(values), value=1 - beta2)
        for st_m, st_v, st_t, p, m, v, t in zip(exp_avg, exp_avg_sq, steps, positions, ms, vs, ts):
            st_m[p], st_v[p], st_t[p] = m, v, t
        td = [t.double() for t in ts]
        # delta = -lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps), per entry with its own step count
        bc1 = torch._foreach_pow(beta1, td)
        torch._foreach_neg_(bc1)
        torch._foreach_add_(bc1, 1)
        bc2 = torch._foreach_pow(beta2, td)
        torch._foreach_neg_(bc2)
        torch._foreach_add_(bc2, 1)
        bc1 = [b.to(g.dtype) for b, g in zip(bc1, values)]
        bc2 = [b.to(g.dtype) for b, g in zip(bc2, values)]
        den = torch._foreach_div(vs, bc2)
        torch._foreach_sqrt_(den)
        torch._foreach_add_(den, eps)
        delta = torch._foreach_div(ms, bc1)
        torch._foreach_mul_(delta, -lr)
        torch._foreach_div_(delta, den)
    for w, idx, d, uo, ui in zip(weights, indices, delta, u_out, u_in):
        if uo is not None:
            sparsegrad_rotated_update_(w, uo, ui, idx, d.to(w.dtype))
        else:
            w.view(-1).index_add_(0, idx, d.to(w.dtype))


# --------------------------------------------------------------------------- the differentiable layer op
# The last sparse gradient's entries, per weight: (a weak reference to the weight, the gradient's values, the flat
# ids, the compact-state keys). The optimizer needs the entries as flat ids and keys, which the COO gradient holds
# only as (row, col) pairs; on a GPU re-deriving them is three more kernel launches per weight and step in a
# host-bound loop. Autograd stores the gradient as a new sparse tensor over the same values, so the values' storage
# identifies it (see take_selection).
# Keyed by id(weight) with a weak reference to it (a WeakKeyDictionary compares tensors with ==); a record goes
# when its weight is freed.
_SELECTIONS: dict[int, tuple[weakref.ref, torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _record_selection(weight: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, keys: torch.Tensor) -> None:
    key = id(weight)

    def gone(ref, key=key):
        rec = _SELECTIONS.get(key)
        if rec is not None and rec[0] is ref:
            del _SELECTIONS[key]

    _SELECTIONS[key] = (weakref.ref(weight, gone), values, ids, keys)


def take_selection(weight: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(flat ids (ascending, int64), the same as compact-state keys (int32 where the weight allows)) of the entries
    in the sparse gradient that the last backward of a :func:`sparse_linear` gave ``weight``, if ``values`` are that
    gradient's values (the same storage: a gradient summed over several backwards has new values and gets None);
    else None. The record is dropped either way."""
    rec = _SELECTIONS.get(id(weight))
    if rec is None or rec[0]() is not weight:
        return None
    del _SELECTIONS[id(weight)]
    _, val, idx, keys = rec
    if val.numel() != values.numel() or val.numel() == 0 or val.data_ptr() != values.data_ptr():
        return None
    return idx, keys


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the operator call when it would be a no-op (a host-bound path on a GPU)."""
    return t if t.dtype == dtype else t.to(dtype)


_LIVE_ROWS_DROP = 7 / 8  # drop the all-zero rows of grad_y when at most this fraction of the rows is live


def _live_rows(g: torch.Tensor) -> torch.Tensor | None:
    """The mask of ``g``'s rows that hold a non-zero, when dropping the others pays: at most 7/8 of the rows live
    (else None). Zero rows add nothing to ``grad_yᵀ x``; they are the padding positions of a batch (about 65 % of
    the rows of a 32-sentence SST-2 batch: their outputs reach no loss, so their gradient is exactly zero) and every
    position but [CLS] in a classifier's last MLP. A first look at 8 columns counts a lower bound of the live rows;
    above 7/8 the full check, a pass over [N, O] (~0.9 ms per MiniLM up-projection on one CPU core), is skipped. (A
    sample of evenly spaced rows would alias with the sequence length: rows 0, 2L, 4L, ... of a flattened batch
    are all [CLS] rows.)"""
    n = g.size(0)
    if int(g[:, :8].ne(0).any(dim=1).sum()) > _LIVE_ROWS_DROP * n:
        return None
    live = g.abs().amax(dim=1).ne(0)  # a NaN row is live (NaN != 0); ~3x faster than g.ne(0).any(dim=1)
    n_live = int(live.sum())
    return live if 0 < n_live <= _LIVE_ROWS_DROP * n else None


class _SparseLinear(torch.autograd.Function):
    """y = x Wᵀ + b. Backward: grad_x = grad_y W (exact), grad_b = Σ grad_y, and for W the top-k entries of the
    ROTATED gradient ``U_outᵀ grad_yᵀ x U_in`` (the gradient with respect to ``W~ = U_outᵀ W U_in``) as a sparse
    COO tensor of W's shape (the bases are square, so ``W~`` and ``W`` have the same shape)."""

    @staticmethod
    def forward(ctx, x, w, bias, u_out, u_in, k, use_reference, sparse_grad, compute_dtype):
        ctx.save_for_backward(x, w, u_out, u_in)
        ctx.k, ctx.use_reference = k, use_reference
        ctx.has_bias, ctx.sparse_grad, ctx.compute_dtype = bias is not None, sparse_grad, compute_dtype
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, w, u_out, u_in = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        g_all = grad_y.reshape(-1, grad_y.shape[-1])
        g2 = g_all  # the weight gradient's rows (all-zero ones may be dropped below)
        # the weight gradient's selection first, the input gradient after it: the selection's [O, I] temporaries
        # (the rotated gradient and its GEMMs' outputs) are freed before grad_x ([N, I], up to 4x larger) exists, so
        # the two never add up in the backward's peak memory
        if ctx.needs_input_grad[1]:
            cd = ctx.compute_dtype or g2.dtype
            x2 = x.reshape(-1, x.shape[-1])
            # rows whose output gradient is exactly zero add nothing to grad_yᵀ x: drop them before the GEMMs (the
            # padding, ~65 % of an SST-2 batch's rows). CPU only: on a GPU the count is a host sync per layer, and the
            # GEMMs it saves are cheap there
            if g2.device.type == "cpu":
                live = _live_rows(g2)
                if live is not None:
                    g2, x2 = g2[live], x2[live]
            uo = _as(u_out, cd) if u_out is not None else None
            ui = _as(u_in, cd) if u_in is not None else None
            fn = sparsegrad_topk_grad_coo_reference if ctx.use_reference else sparsegrad_topk_grad_coo
            ind, keys, val = fn(_as(g2, cd).contiguous(), _as(x2, cd).contiguous(), uo, ui, ctx.k)
            val = _as(val, grad_y.dtype)
            grad_w = torch.sparse_coo_tensor(ind[:2], val, w.shape, is_coalesced=True, check_invariants=False)
            if ctx.sparse_grad:
                _record_selection(w, val, ind[2], keys)
            else:
                grad_w = grad_w.to_dense()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g_all.sum(0)
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ _as(w, grad_y.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def sparse_linear(x, w, bias, u_out, u_in, k, use_reference: bool = False, sparse_grad: bool = True,
                  compute_dtype: torch.dtype | None = None):
    """Linear layer ``y = x wᵀ + b`` with SparseGrad's backward (see module docstring): ``w``'s gradient is the
    top-k of the rotated gradient ``U_outᵀ grad_yᵀ x U_in`` (the ordinary weight gradient's top-k when both
    rotations are None), as a sparse COO tensor. ``sparse_grad=False`` returns it as a dense tensor that is zero
    outside the top-k entries. ``compute_dtype`` (e.g. ``torch.bfloat16``) runs the weight-gradient GEMMs and the
    selection in that dtype (the input gradient stays in the input's dtype)."""
    return _SparseLinear.apply(x, w, bias, u_out, u_in, int(k), bool(use_reference), bool(sparse_grad),
                               compute_dtype)
