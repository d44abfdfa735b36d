"""Apply SparseGrad / MeProp to a model: HOSVD calibration, layer swap, revert, and the sparse optimizer."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from scalerec.ops.sparse_grad import (sparsegrad_compact_merge, sparsegrad_compact_merge_reference,
                                      compact_words, sparsegrad_lazy_adam_, sparsegrad_lazy_adam_reference,
                                      step_count_dtype, take_selection)
from scalerec.peft.config import GRAD_DTYPES, MePropConfig, SparseGradConfig, find_targets
from scalerec.peft.layers import SparseGradLinear

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def default_loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """Hugging Face convention: the batch is a dict of model kwargs including ``labels``; the output has ``loss``."""
    return model(**batch).loss


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _top_eigvecs(gram: torch.Tensor) -> torch.Tensor:
    """Orthogonal eigenvectors of a symmetric PSD matrix, columns sorted by decreasing eigenvalue.

    Diagonalised in float32 (scaled to unit trace): LAPACK's float64 ``syevd`` is several times slower on CPU,
    and float32 eigenvectors are orthogonal to ~1e-6.
    """
    gram = gram.float()
    gram.div_(gram.diagonal().sum().clamp_min(torch.finfo(torch.float32).tiny))
    _, vecs = torch.linalg.eigh(gram)
    return vecs.flip(-1)


def _orthonormal(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``u`` (orthogonal to float32 round-off) made orthonormal to the round-off of ``dtype`` (a QR in that dtype,
    float32 for half types; the columns keep their directions), stored column-major (its transpose contiguous):
    the sparse update reads whole columns of the bases (U[:, j] as a contiguous row of Uᵀ) instead of copying a
    transposed base on every step.

    The layer updates ``W`` by ``U_out D U_inᵀ`` and reads ``W~`` back as ``U_outᵀ W U_in``; that is the exact
    inverse only when the bases are orthonormal, so a float64 model gets float64-orthonormal bases."""
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, r = torch.linalg.qr(u.to(work))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(dtype).t().contiguous().t()


def calibrate_bases(model: nn.Module, targets: dict[str, list[str]], batches: Iterable[Any], steps: int,
                    loss_fn: LossFn = default_loss_fn) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HOSVD of the stacked weight gradients of each layer type, over ``steps`` calibration batches.

    For a layer type with gradients ``G_{l,s}`` ([out, in], over its layers l and the steps s), the left singular
    vectors of the output-dim unfolding ``[G_{1,1} G_{1,2} ...]`` are the eigenvectors of ``Σ G Gᵀ`` and those of
    the input-dim unfolding are the eigenvectors of ``Σ Gᵀ G``: the Gram matrices are accumulated in place
    (float32, memory out² + in² per type, never the whole stack) and diagonalised once. The model's weights are not
    updated; ``requires_grad`` flags are restored afterwards.
    """
    modules = {n: model.get_submodule(n) for names in targets.values() for n in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)
        m.weight.grad = None
    grams = {t: [None, None] for t in targets}
    done = 0
    was_training = model.training
    model.train()
    try:
        for batch in batches:
            if done >= steps:
                break
            loss = loss_fn(model, batch)
            loss.backward()
            for t, names in targets.items():
                for n in names:
                    g = modules[n].weight.grad.detach().float()
                    for side, a, b in ((0, g, g.t()), (1, g.t(), g)):
                        if grams[t][side] is None:
                            grams[t][side] = a @ b
                        else:
                            grams[t][side].addmm_(a, b)
                    modules[n].weight.grad = None
            done += 1
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        for m in modules.values():
            m.weight.grad = None
        model.train(was_training)
    if done == 0:
        raise ValueError("SparseGrad calibration got no batches (calibration_steps >= 1 batches are needed)")
    bases = {}
    for t in list(grams):
        go, gi = grams.pop(t)
        dtype = modules[targets[t][0]].weight.dtype
        bases[t] = (_orthonormal(_top_eigvecs(go), dtype), _orthonormal(_top_eigvecs(gi), dtype))
        del go, gi
    _release_freed_memory()
    return bases


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, inflating the process's RSS)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _swap(model: nn.Module, targets: dict[str, list[str]], make: Callable[[str, nn.Linear], SparseGradLinear]):
    for t, names in targets.items():
        for n in names:
            parent, child = _get_parent(model, n)
            setattr(parent, child, make(t, getattr(parent, child)))


def apply_sparsegrad(model: nn.Module, config: SparseGradConfig, calibration_data: Iterable[Any] | None = None,
                     loss_fn: LossFn = default_loss_fn,
                     bases: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> nn.Module:
    """Replace the targeted linears of ``model`` (in place) by :class:`SparseGradLinear` and return the model.

    The rotations come from ``bases`` ({pattern: (U_out, U_in)}) when given, else from an HOSVD calibration over
    ``config.calibration_steps`` batches of ``calibration_data`` (``loss_fn(model, batch)`` gives the loss).
    Only the weights (trained through their rotated gradients) and, if ``config.train_bias``, the biases of the
    targeted layers are made trainable here; everything else keeps its ``requires_grad`` flag (freeze the rest
    yourself, e.g. with :func:`freeze_except_head`).
    """
    if not isinstance(config, SparseGradConfig):
        raise ValueError(f"apply_sparsegrad: config must be a SparseGradConfig, got {type(config).__name__}")
    targets = find_targets(model, config.target_modules, "SparseGradConfig")
    if bases is None:
        if calibration_data is None:
            raise ValueError("apply_sparsegrad: pass calibration_data (batches for the HOSVD) or precomputed bases")
        bases = calibrate_bases(model, targets, calibration_data, config.calibration_steps, loss_fn)
    for t, names in targets.items():
        if t not in bases:
            raise ValueError(f"apply_sparsegrad: bases has no entry for layer type {t!r}")
        lin = model.get_submodule(names[0])
        u_out, u_in = bases[t]
        if tuple(u_out.shape) != (lin.out_features,) * 2 or tuple(u_in.shape) != (lin.in_features,) * 2:
            raise ValueError(f"apply_sparsegrad: bases[{t!r}] must be ([{lin.out_features}]², [{lin.in_features}]²), "
                             f"got {tuple(u_out.shape)}, {tuple(u_in.shape)}")
    _swap(model, targets, lambda t, lin: SparseGradLinear(
        lin, bases[t][0], bases[t][1], config.k_for(lin.out_features, lin.in_features), config.train_bias,
        config.use_reference, GRAD_DTYPES[config.grad_dtype]))
    model.sparsegrad_config = config
    _release_freed_memory()
    return model


def apply_meprop(model: nn.Module, config: MePropConfig) -> nn.Module:
    """MeProp baseline: the targeted linears keep their weight (no rotation) and get its top-k gradient."""
    if not isinstance(config, MePropConfig):
        raise ValueError(f"apply_meprop: config must be a MePropConfig, got {type(config).__name__}")
    targets = find_targets(model, config.target_modules, "MePropConfig")
    _swap(model, targets, lambda t, lin: SparseGradLinear(
        lin, None, None, config.k_for(lin.out_features, lin.in_features), config.train_bias,
        config.use_reference, GRAD_DTYPES[config.grad_dtype]))
    return model


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseGradLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseGradLinear)]


def revert_sparsegrad(model: nn.Module) -> nn.Module:
    """Replace every :class:`SparseGradLinear` by a plain ``nn.Linear`` with its trained weight, in place."""
    for n, m in sparse_layers(model):
        parent, child = _get_parent(model, n)
        setattr(parent, child, m.revert())
    if hasattr(model, "sparsegrad_config"):
        del model.sparsegrad_config
    return model


class SparseGradOptimizer(torch.optim.Optimizer):
    """Adam for a model with SparseGrad/MeProp layers: lazy (sparse) Adam on the rotated weights, AdamW elsewhere.

    A SparseGrad layer's gradient holds k entries of the rotated weight ``W~ = U_outᵀ W U_in``; the step changes
    exactly those k entries of ``W~`` (their moments included) and adds the change to the layer's weight
    ``W`` as ``U_out D U_inᵀ`` (``sparsegrad_rotated_update_``, inside ``sparsegrad_lazy_adam_``; ``W~`` itself is
    never stored).

    ``state_layout`` chooses how the moments are kept:

    * ``"compact"`` (``"auto"``, the default): for the entries selected so far only, in ascending id order in a
      buffer with room to spare, with a bitmap of which entries those are (one bit per weight entry; an entry's
      slot is its rank in the bitmap). ``scalerec::sparsegrad_compact_merge`` adds each step's new entries without
      a host sync. 10 bytes per selected entry with int16 step counts (see ``step_count_dtype``) plus 1/8 byte per
      weight entry, against 14 with the sorted int32 ids that the bitmap replaced. The host keeps
      an upper bound of the set's size (it grows by at most the k selected entries a step); a set whose bound
      leaves no room for the next step's keys grows to hold ``slack_steps`` steps' worth beyond it. The exact
      sizes follow each step to the host in one non-blocking copy for all weights and tighten the bounds once
      they have arrived, so no step waits for them (on a CPU they arrive at once). Memory follows the union of the selected entries (24 % of MiniLM's MLP entries after 300 steps on
      SST-2), not the weight's size.
    * ``"dense"``: moments and step counts as dense tensors of the weight's shape (10 bytes per weight entry with
      int16 step counts; no merging at all).

    Both layouts give the same updates bit for bit.

    ``fused`` (default) runs the lazy-Adam step of all rotated weights as one C++ operator call
    (``scalerec::sparsegrad_lazy_adam_``: one element-wise kernel and the rotated update per weight) and merges
    the compact sets with the C++ operator; ``fused=False`` runs their pure-PyTorch references (a Python loop of
    ``torch._foreach_*`` calls, a sort per merge). They agree to rounding; the operators exist because on a GPU the
    Python loop is host-bound (H100: the step spanned 9.9 ms of the GPU timeline for MiniLM's 12 MLP linears,
    LoRA's AdamW 1.1 ms).
    """

    STATE_LAYOUTS = ("auto", "compact", "dense")

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, sparse_lr: float | None = None, head_lr: float | None = None,
                 head_names: Iterable[str] = ("classifier", "score"), state_layout: str = "auto",
                 fused: bool = True, slack_steps: int = 4):
        if state_layout not in self.STATE_LAYOUTS:
            raise ValueError(f"SparseGradOptimizer: state_layout must be one of {list(self.STATE_LAYOUTS)}, "
                             f"got {state_layout!r}")
        if isinstance(slack_steps, bool) or not isinstance(slack_steps, int) or slack_steps < 1:
            raise ValueError(f"SparseGradOptimizer: slack_steps must be an int >= 1, got {slack_steps!r}")
        self.state_layout = state_layout
        self.slack_steps = slack_steps
        self.size_reads = 0  # the compact sets' sizes taken on the host (one non-blocking copy for all weights each)
        self._sizes_in_flight = None  # (event or None, host tensor, the sets' states) of the last sizes' copy
        self._sizes_host = None  # its host buffer (pinned on a GPU)
        self.fused = bool(fused)
        self._layers = {id(m.weight): m for _, m in sparse_layers(model)}
        heads = tuple(head_names)
        sparse, dense, head = [], [], []
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) in self._layers:
                sparse.append(p)
            elif head_lr is not None and any(h in n.split(".") for h in heads):
                head.append(p)
            else:
                dense.append(p)
        groups = []
        if sparse:
            groups.append({"params": sparse, "sparse": True, "lr": sparse_lr if sparse_lr is not None else lr,
                           "weight_decay": 0.0})
        if dense:
            groups.append({"params": dense, "sparse": False, "lr": lr, "weight_decay": weight_decay})
        if head:
            groups.append({"params": head, "sparse": False, "lr": head_lr, "weight_decay": weight_decay})
        if not groups:
            raise ValueError("SparseGradOptimizer: the model has no trainable parameters")
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, except that the lazy-Adam state's integer tensors (the entry
        bitmap and count, per-entry step counts) keep their dtype: the base class casts every state tensor of a
        float parameter to the parameter's dtype, which would turn them into floats (and round values above 2^24).
        A compact state saved with sorted entry ids (before the bitmap) is converted to the bitmap here."""
        ints = {}
        state = {}
        for pid, st in state_dict["state"].items():
            ints[pid] = {k: v for k, v in st.items() if isinstance(v, torch.Tensor) and not v.is_floating_point()
                         and not v.is_complex() and k != "step"}
            state[pid] = {k: v for k, v in st.items() if k not in ints[pid]}
        super().load_state_dict({**state_dict, "state": state})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            st = self.state[p]
            for k, v in ints.get(pid, {}).items():
                st[k] = v.to(device=p.device, copy=True)
            if "idx" in st:  # saved with sorted int32/int64 ids (before the bitmap): the same slots in the same order
                old = st.pop("idx")
                ids = old[old != torch.iinfo(old.dtype).max]
                st["words"] = compact_words(ids, p.numel())
                st["count"] = torch.tensor(ids.numel(), dtype=torch.long, device=p.device)
                st["bound"] = ids.numel()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            live = [p for p in group["params"] if p.grad is not None]
            for p in live:
                st = self.state[p]
                st["step"] = st.get("step", 0) + 1
            if group["sparse"]:
                self._sparse_steps(live, lr, b1, b2, eps)
            else:
                self._dense_steps(live, lr, b1, b2, eps, wd)
        return loss

    def _dense_steps(self, params, lr, b1, b2, eps, wd):
        """AdamW, with the parameters that share a step count updated together (torch._foreach_*: on a GPU a few
        multi-tensor kernels instead of ~8 launches per parameter)."""
        by_t: dict[int, list] = {}
        for p in params:
            st = self.state[p]
            if "m" not in st:
                st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
            by_t.setdefault(st["step"], []).append(p)
        for t, ps in by_t.items():
            gs = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in ps]
            ms = [self.state[p]["m"] for p in ps]
            vs = [self.state[p]["v"] for p in ps]
            if wd:
                torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_mul_(ms, b1)
            torch._foreach_add_(ms, gs, alpha=1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
            denom = torch._foreach_div(vs, 1 - b2 ** t)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ps, ms, denom, value=-lr / (1 - b1 ** t))

    def _selection(self, p):
        """(flat indices, values, the indices as compact-state keys or None) of the entries in ``p``'s gradient."""
        g = p.grad
        if g.is_sparse:
            # autograd drops the coalesced flag when it stores a sparse gradient, but one backward's selection (k
            # entries from sparsegrad_topk_grad: distinct, ascending) needs no coalescing, which is a sort and
            # several host syncs on a GPU; a gradient accumulated over several backwards (more than k entries) is
            # coalesced, so that its repeated entries are summed
            layer = self._layers.get(id(p))
            if not g.is_coalesced() and not (layer is not None and g._nnz() == layer.k):
                g = g.coalesce()
            taken = take_selection(p, g._values())  # the backward's own flat ids, when this is its gradient
            if taken is not None:
                return taken[0], g._values(), taken[1]
            r, c = g._indices()
            return r * p.shape[1] + c, g._values(), None
        # a dense gradient (e.g. from another backward): treat its nonzeros as the selected entries
        flat = g.reshape(-1)
        idx = flat.nonzero().squeeze(1)
        return idx, flat[idx], None

    def _sparse_steps(self, params, lr, b1, b2, eps):
        """Lazy Adam on the selected entries of every rotated weight of the group: the entries and their places in
        the state (dense or compact layout) are found here; the state's gather, the Adam arithmetic, the write-back
        and the layers' dense-weight updates run in one ``sparsegrad_lazy_adam_`` call (or its reference)."""
        items, step_dtypes, given_keys = [], [], []
        for p in params:
            idx, val, key = self._selection(p)
            if idx.numel() == 0:
                continue
            st = self.state[p]
            dense = self.state_layout == "dense"
            if "m" in st and dense == ("words" in st):  # the compact state has an entry set
                raise ValueError(f"SparseGradOptimizer: this optimizer keeps {'dense' if dense else 'compact'} "
                                 "moments, but the loaded state has the other layout; use the state_layout it was "
                                 "saved with")
            tdt = step_count_dtype(b1, b2, val.dtype)
            if dense and "m" not in st:
                st["m"], st["v"] = torch.zeros_like(p).view(-1), torch.zeros_like(p).view(-1)
                st["t"] = torch.zeros(p.numel(), dtype=tdt, device=p.device)
            if "t" in st and st["t"].dtype != tdt:  # a loaded state, or betas changed: narrowing is exact (see
                st["t"] = st["t"].clamp(max=torch.iinfo(tdt).max).to(tdt)  # step_count_dtype), widening too
            items.append((p, st, idx, val))
            step_dtypes.append(tdt)
            given_keys.append(key)
        if not items:
            return
        if self.state_layout == "dense":
            where = [it[2] for it in items]
        else:
            where = self._compact_positions(items, step_dtypes, given_keys)
        layers = [self._layers.get(id(it[0])) for it in items]
        rot = [m if m is not None and m.rotated else None for m in layers]
        step = sparsegrad_lazy_adam_ if self.fused else sparsegrad_lazy_adam_reference
        step([it[0] for it in items], [it[1]["m"] for it in items], [it[1]["v"] for it in items],
             [it[1]["t"] for it in items], where, [it[2] for it in items], [it[3] for it in items],
             [m.u_out if m is not None else None for m in rot], [m.u_in if m is not None else None for m in rot],
             lr, b1, b2, eps)
        for m in layers:
            if m is not None:
                m.accept_weight_change()

    def _compact_positions(self, items, step_dtypes, given_keys) -> list[torch.Tensor]:
        """Merge each weight's selected entries into its compact entry set (new ones with zero moments) and return
        their slots in it. Room first, without a host sync: a weight's set grows by at most its k selected entries a
        step, and ``st["bound"]`` (host) is an upper bound of its size. After each step's merges the exact sizes of
        all sets go to the host in one non-blocking copy (:meth:`_send_sizes`); when it has arrived (on a GPU: its
        event has completed; on a CPU: at once) a set's bound becomes that size plus the keys merged since
        (:meth:`_take_sizes`). A set whose bound leaves no room for this step's keys grows to hold ``slack_steps``
        steps' worth beyond its bound. ``given_keys``: the selection's ids from the backward (int32 where the weight
        allows), or None."""
        keys, sets = [], []
        self._take_sizes()
        for (p, st, idx, val), tdt, key in zip(items, step_dtypes, given_keys):
            keys.append(idx if key is None else key)
            if "words" not in st:
                cap = min(p.numel(), self.slack_steps * idx.numel())
                st["words"] = torch.zeros(-(-p.numel() // 64), dtype=torch.long, device=p.device)
                st["m"] = torch.zeros(cap, dtype=val.dtype, device=p.device)
                st["v"] = torch.zeros_like(st["m"])
                st["t"] = torch.zeros(cap, dtype=tdt, device=p.device)  # per-entry step counts
                st["count"] = torch.zeros((), dtype=torch.long, device=p.device)
                st["bound"] = 0
            cap, k = st["m"].numel(), idx.numel()
            bound = st.get("bound", cap)  # a state saved without a bound: its buffer was cut to its entries
            if cap < p.numel() and bound + k > cap:  # (a set as large as the weight cannot run out of room)
                grow = min(p.numel(), bound + self.slack_steps * k) - cap
                for name in ("m", "v", "t"):
                    st[name] = torch.cat([st[name], st[name].new_zeros(grow)])
        merge = sparsegrad_compact_merge if self.fused else sparsegrad_compact_merge_reference
        where = []
        for (p, st, idx, val), key in zip(items, keys):
            st["words"], st["m"], st["v"], st["t"], pos, st["count"] = merge(st["words"], st["m"], st["v"], st["t"],
                                                                             key, p.numel())
            st["bound"] = min(st["m"].numel(), st.get("bound", st["m"].numel()) + key.numel())
            st["merged_since_sent"] = st.get("merged_since_sent", 0) + key.numel()
            sets.append(st)
            where.append(pos)
        self._send_sizes(sets)
        return where

    def _send_sizes(self, sets: list[dict]) -> None:
        """Start copying the sets' sizes to the host: one stack and one copy; on a GPU a non-blocking copy into a
        pinned buffer (kept for the next copies) with an event behind it. Skipped while the last copy is untaken."""
        if self._sizes_in_flight is not None or not sets:
            return
        counts = torch.stack([st["count"] for st in sets])
        cuda = counts.device.type == "cuda"
        host = self._sizes_host
        if host is None or host.shape != counts.shape or host.dtype != counts.dtype:
            host = self._sizes_host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=cuda)
        host.copy_(counts, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(counts.device))
        for st in sets:
            st["merged_since_sent"] = 0
        self._sizes_in_flight = (event, host, sets)

    def _take_sizes(self) -> None:
        """Tighten the bounds with the sizes sent after an earlier step, if they have arrived (never waits)."""
        if self._sizes_in_flight is None:
            return
        event, host, sets = self._sizes_in_flight
        if event is not None and not self._arrived(event):
            return
        self._sizes_in_flight = None
        self.size_reads += 1
        for st, n in zip(sets, host.tolist()):
            if "bound" in st:
                st["bound"] = min(st["bound"], n + st.get("merged_since_sent", 0))

    @staticmethod
    def _arrived(event) -> bool:
        """Whether a size copy's event has completed (``cudaEventQuery``: no wait)."""
        return event.query()


def freeze_except_head(model: nn.Module, head_names: Iterable[str] = ("classifier", "score")) -> None:
    """Freeze every parameter except those of the SparseGrad/MeProp layers and of the named head modules."""
    heads = tuple(head_names)
    for n, p in model.named_parameters():
        parts = n.split(".")
        p.requires_grad_(any(h in parts for h in heads))
    for _, m in sparse_layers(model):
        m.weight.requires_grad_(True)
        if m.bias is not None:
            m.bias.requires_grad_(m.train_bias)


def count_trainable(model: nn.Module, sparse_as_k: bool = True) -> int:
    """Trainable parameters; a SparseGrad/MeProp weight counts as its k entries updated per step."""
    seen = {id(m.weight): m.k for _, m in sparse_layers(model)} if sparse_as_k else {}
    return sum(seen.get(id(p), p.numel()) for p in model.parameters() if p.requires_grad)
