"""A frozen causal LM partitioned over a process group with DeepSpeed ZeRO-3, and the per-rank fitting loop.

Each rank holds 1/W of every parameter (``deepspeed.zero.Init``: a module's parameters are partitioned as soon as
the module is built, so no rank ever holds the whole model); ``DeepSpeedZeRoOffload`` (DeepSpeed's ZeRO-3 parameter
hooks without an optimizer) gathers a module's parameters just before its forward and again in the backward, and
frees them after. No parameter requires a gradient and no optimizer exists for the model: the only trainable
tensors are the per-text vectors, which live on the rank that fits the text.

Data parallel over texts, model sharded: every rank fits its own texts, but every forward and backward is a
collective (the all-gathers of each layer), so all ranks step together. A rank whose texts are all done takes
*idle steps* (a one-position forward and backward, to serve its shards to the others) until every rank is done:
one all-reduce of a flag per step decides that. Inside a rank, **slot refill**: up to ``batch_size`` texts are fitted
at once and a text that finishes (exact, or out of budget) leaves its slot to the next waiting text at once, so a
batch never idles on its hardest text.

The arithmetic of a step is the eager fitter's (``scalerec.llm.fit_step``: per-text losses, per-text AdamW, clip,
schedule; initialisation and restarts seeded by the text only), so a text's fit does not depend on its rank, its
batch or its slot: the sharded fit equals the unsharded one (``tests/test_llm_sharded.py``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported; a GPU rank sets "cuda" first

import torch  # noqa: E402

from .fit_config import (FitConfig, FitResult, _check_tokens, _text_seed, padded_targets,  # noqa: E402
                         restart_patience_for)
from .fit_step import adamw_rows, text_losses  # noqa: E402
from .model_config import WeightSource, construct  # noqa: E402


def ds_config() -> dict:
    """ZeRO-3 for a frozen model: every parameter partitioned (no persistence threshold: small ones too, so that the
    tests' tiny models are really sharded), no optimizer."""
    return {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  "stage3_model_persistence_threshold": 0, "overlap_comm": False,
                                  "stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0,
                                  "stage3_max_live_parameters": 0,
                                  # ZeRO's own linear (the default) saves the parameter for the backward and
                                  # gathers it again there; torch's F.linear saves weight.t(), a view that keeps
                                  # every gathered layer alive until the backward: measured with it off, the W = 2
                                  # ranks of SmolLM2-1.7B grew to 10 GB each in the fit (the model is 6.85 GB)
                                  "memory_efficient_linear": True}}


@dataclass
class ShardedLM:
    """The partitioned model and what the fitters need of it (duck-types :class:`scalerec.llm.model.LoadedLM` for
    ``_check_tokens``)."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    sink_id: int | None
    sink: torch.Tensor | None      # [d] the sink token's embedding (model dtype)
    emb_mean: torch.Tensor         # [d] float32: mean token embedding (initialisation)
    emb_std: float                 # the embedding table's std (initialisation noise)
    hidden_size: int
    max_positions: int
    rank: int
    world: int

    @property
    def embedding(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def logits(self, xin: torch.Tensor, mode: str, L: int, shared_m: torch.Tensor | None = None,
               tok_prev: torch.Tensor | None = None) -> torch.Tensor:
        """``fit_step.fit_logits`` for the partitioned model: the same inputs and the same arithmetic, with the sink
        row taken from :attr:`sink` (the embedding table itself is partitioned)."""
        B, _, d = xin.shape
        if mode == "one-step":
            m = xin[:, 1:2, :] if shared_m is None else shared_m
            inner = torch.cat([xin[:, 0:1, :], m.expand(B, L - 1, d)], dim=1)
        else:
            inner = torch.cat([xin, tok_prev], dim=1)
        # the same two concatenations as inputs.one_step_inputs / with_sink, so the autograd graph of the inputs is
        # the unsharded one's
        ns = 0 if self.sink is None else 1
        inputs = inner if not ns else torch.cat([self.sink.to(xin.dtype).view(1, 1, d).expand(B, 1, d), inner], dim=1)
        logits = self.model(inputs_embeds=inputs, use_cache=False).logits
        if mode == "one-step":
            return logits[:, ns:, :].float()
        off = ns + xin.shape[1] - 1
        return logits[:, off: off + L, :].float()

    def init_vectors(self, n_vectors: int, cfg: FitConfig, toks: list[int], restart: int = 0) -> torch.Tensor:
        """``fit_config._init_vectors`` with the table's statistics computed once: [n_vectors, d] float32."""
        gen = torch.Generator().manual_seed(_text_seed(cfg.seed, toks, restart))
        noise = torch.randn(n_vectors, self.hidden_size, generator=gen) * self.emb_std * cfg.init_noise
        if cfg.init == "mean":
            return self.emb_mean.view(1, -1) + noise
        if cfg.init == "normal":
            return noise
        raise ValueError(f"unknown init {cfg.init!r}: 'mean' or 'normal'")


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("the sharded model needs a torch.distributed process group (scalerec.llm.sharded_job "
                           "forms one over Ray actors)")
    return dist.get_rank(), dist.get_world_size()


def build_sharded_lm(config, source: WeightSource, dtype: torch.dtype = torch.float32, tokenizer=None,
                     sink: str | int | None = "bos", name: str = "", device: str | torch.device = "cpu") -> ShardedLM:
    """Build the model partitioned over the current process group and load ``source``'s weights into it.

    Construction happens under ``deepspeed.zero.Init`` (a module's parameters are partitioned when the module is
    built: a rank holds at most one module's full parameters at once, and only while it is being built). Weights
    are then loaded one parameter at a time: the parameter is gathered, rank 0 reads that one tensor from the source
    (a lazily opened safetensors file, or the seeded random generator) and copies it in, and the parameter is
    re-partitioned (``GatheredParameters(modifier_rank=0)``): no rank holds more than one full tensor of it.
    """
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    rank, world = _rank_world()
    deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False, verbose=False)
    cfg = ds_config()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # tensor_overrides=[]: keep the construction dtype (ZeRO's own cast knows fp16/bf16/fp32 only; float64 is
        # the equality tests' dtype); dtype=torch.float only satisfies its check
        with deepspeed.zero.Init(config_dict_or_path=cfg, dtype=torch.float, tensor_overrides=[]):
            model = construct(config, dtype)
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(source.get(pname, p.ds_shape, dtype))
    model.eval()
    model.requires_grad_(False)
    # release every parameter right after its module ran (max_reuse_distance 0: ZeRO's default, 1e9, keeps a
    # parameter gathered until its reuse in the backward, i.e. nearly the whole model on every rank), no prefetch
    DeepSpeedZeRoOffload(model, timers=None, ds_config=DeepSpeedConfig(cfg), overlap_comm=False,
                         prefetch_bucket_size=0, max_reuse_distance=0, max_live_parameters=0,
                         param_persistence_threshold=0, model_persistence_threshold=0)
    emb = model.get_input_embeddings()
    sink_id = _sink_id(tokenizer, config, sink)
    with deepspeed.zero.GatheredParameters([emb.weight]):
        W = emb.weight.detach()
        Wf = W.float()
        emb_mean, emb_std = Wf.mean(0).cpu(), Wf.std().item()
        sink_vec = None if sink_id is None else W[sink_id].clone()
        del W, Wf
    maxpos = int(getattr(config, "max_position_embeddings", 0) or 2048)
    return ShardedLM(model=model, tokenizer=tokenizer, name=name, device=torch.device(device), dtype=dtype,
                     sink_id=sink_id, sink=sink_vec, emb_mean=emb_mean, emb_std=emb_std,
                     hidden_size=int(config.hidden_size), max_positions=maxpos, rank=rank, world=world)


def _sink_id(tokenizer, config, sink) -> int | None:
    """As ``model._sink_id``: the tokenizer's BOS (else EOS); without a tokenizer, the config's."""
    if sink is None or isinstance(sink, int):
        return sink
    if sink != "bos":
        raise ValueError(f"unknown sink {sink!r}: 'bos', a token id, or None")
    for src in (tokenizer, config):
        if src is None:
            continue
        for tid in (getattr(src, "bos_token_id", None), getattr(src, "eos_token_id", None)):
            if isinstance(tid, list):
                tid = tid[0] if tid else None
            if tid is not None:
                return int(tid)
    raise ValueError("neither the tokenizer nor the config has a BOS or EOS token: pass sink=<token id> or None")


# ----------------------------------------------------------------------------------------------
# the per-rank fitting loop

def fit_sharded(slm: ShardedLM, token_lists: list[list[int]], n_vectors: int, mode: str, cfg: FitConfig,
                batch_size: int = 8, shared_m: torch.Tensor | None = None, on_done=None,
                loss_log: list | None = None, record_history: bool = False) -> list[FitResult]:
    """Fit this rank's texts; every rank of the group must call it (with its own texts, possibly none).

    Up to ``batch_size`` texts are fitted at once; a finished text's slot goes to the next waiting text (slot
    refill). Per text the fit is the eager fitter's (``fitting._fit_eager``): same initialisation, losses, AdamW,
    best state, restarts. ``on_done(i, result)`` is called as text ``i`` finishes (e.g. to write a finished shard);
    ``loss_log`` (a list) receives, per text, its per-step mean CE; ``record_history``: per-step accuracies in
    ``FitResult.history``. ``grow_from`` and ``polish_steps`` are not supported here (a clear error).
    """
    import torch.distributed as dist

    if cfg.grow_from or cfg.polish_steps:
        raise ValueError("grow_from and polish_steps are not supported with a sharded model (--shard-model); "
                         "run them data-parallel")
    if mode not in ("one-step", "ar"):
        raise ValueError(f"unknown mode {mode!r}: 'one-step' or 'ar'")
    try:  # every rank checks its texts before the first collective: one bad text stops all ranks, none hangs
        _check_tokens(slm, token_lists, n_vectors if mode == "ar" else 0)
        bad = None
    except ValueError as exc:
        bad = str(exc)
    errors = [None] * slm.world
    dist.all_gather_object(errors, bad)
    if any(e is not None for e in errors):
        raise ValueError("; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None))
    dev, dt, d = slm.device, slm.dtype, slm.hidden_size
    n = len(token_lists)
    st = _Slots(max(1, min(int(batch_size), n)), n_vectors, d, dev)
    seconds = [0.0] * n
    hist: list[list[float]] = [[] for _ in range(n)]
    if loss_log is not None:
        loss_log[:] = [[] for _ in range(n)]
    results: list[FitResult | None] = [None] * n
    patience = [restart_patience_for(cfg, len(t)) for t in token_lists]
    sm = None if shared_m is None else shared_m.detach().to(dev, dt).view(d)
    nxt = 0                                  # next waiting text
    flag_dev = dev if dev.type == "cuda" else torch.device("cpu")
    emb = slm.embedding

    while True:
        for s in range(st.B):                # slot refill
            if st.text_of[s] < 0 and nxt < n:
                st.start(s, nxt, slm.init_vectors(n_vectors, cfg, token_lists[nxt]).to(dev))
                nxt += 1
        slots = [s for s in range(st.B) if st.text_of[s] >= 0]
        flag = torch.tensor([1 if slots else 0], device=flag_dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) == 0:
            break
        if not slots:
            _idle_step(slm, mode, n_vectors, sm)
            continue
        t0 = time.perf_counter()
        idx = torch.tensor(slots)
        texts = [st.text_of[s] for s in slots]
        lengths, tgt = padded_targets([token_lists[i] for i in texts])
        L = int(lengths.max())
        tgt = tgt.to(dev)
        x = st.P[idx.to(dev)].clone().requires_grad_(True)
        tok_prev = emb(tgt.clamp(min=0))[:, :-1, :] if mode == "ar" else None
        shared = None if sm is None else sm.view(1, 1, d).expand(len(slots), 1, d)
        logits = slm.logits(x.to(dt), mode, L, shared_m=shared, tok_prev=tok_prev)
        loss_per, plain, acc = text_losses(logits, tgt, cfg)
        loss_per.sum().backward()
        with torch.no_grad():
            acc, lossc = acc.cpu(), plain.float().cpu()
            st.record(idx, acc, lossc)
            for j, i in enumerate(texts):
                if record_history:
                    hist[i].append(float(acc[j]))
                if loss_log is not None:
                    loss_log[i].append(float(lossc[j]))
            done = (acc >= cfg.target_accuracy) | (st.total[idx] >= cfg.max_steps)
            gi = idx[~done]
            if len(gi):
                st.update(gi, x.grad.detach().float()[(~done).to(dev)], cfg)
                for s in gi.tolist():
                    pat = patience[st.text_of[s]]
                    if pat is not None and st.since_best[s] >= pat:
                        st.restart(s, slm.init_vectors(n_vectors, cfg, token_lists[st.text_of[s]],
                                                       int(st.restarts[s]) + 1).to(dev))
        dt_step = time.perf_counter() - t0
        share = lengths.double() / lengths.double().sum()
        for j, i in enumerate(texts):
            seconds[i] += dt_step * float(share[j])
        for j in done.nonzero().flatten().tolist():
            s, i = slots[j], texts[j]
            results[i] = FitResult(vectors=st.best_P[s].detach().float().cpu().clone(),
                                   token_ids=list(token_lists[i]), accuracy=float(st.best_acc[s]),
                                   steps=int(st.total[s]), seconds=seconds[i], loss=float(st.best_loss[s]),
                                   restarts=int(st.restarts[s]), history=hist[i])
            st.text_of[s] = -1
            if on_done is not None:
                on_done(i, results[i])
    return results


class _Slots:
    """The per-slot state of :func:`fit_sharded` (rows of one tensor per quantity, as in the eager fitter): the
    vectors and their AdamW moments (float32), the best state, step counters, restarts."""

    def __init__(self, B: int, n_vectors: int, d: int, dev: torch.device):
        self.B = B
        self.P = torch.zeros(B, n_vectors, d, device=dev)
        self.exp_avg, self.exp_sq, self.best_P = (torch.zeros_like(self.P) for _ in range(3))
        self.step, self.total, self.since_best, self.restarts = (torch.zeros(B, dtype=torch.long) for _ in range(4))
        self.best_acc = torch.full((B,), -1.0)
        self.best_loss = torch.full((B,), float("inf"))
        self.text_of = [-1] * B             # the text in each slot (-1: free)

    def start(self, s: int, i: int, P0: torch.Tensor) -> None:
        """Text ``i`` takes slot ``s`` with initial vectors ``P0``."""
        self.text_of[s] = i
        self.P[s] = P0
        self.best_P[s] = P0
        self.exp_avg[s] = 0
        self.exp_sq[s] = 0
        for t in (self.step, self.total, self.since_best, self.restarts):
            t[s] = 0
        self.best_acc[s], self.best_loss[s] = -1.0, float("inf")

    def record(self, idx: torch.Tensor, acc: torch.Tensor, loss: torch.Tensor) -> None:
        """The step's accuracy and loss of the slots ``idx`` (measured before their update): best state (highest
        accuracy, then lowest loss), steps without a better accuracy, steps spent."""
        prev_acc, prev_loss = self.best_acc[idx], self.best_loss[idx]
        better = (acc > prev_acc) | ((acc == prev_acc) & (loss < prev_loss))
        bi = idx[better]
        dev_bi = bi.to(self.P.device)
        self.best_P[dev_bi] = self.P[dev_bi]
        self.best_acc[bi], self.best_loss[bi] = acc[better], loss[better]
        self.since_best[idx] = torch.where(acc > prev_acc, 0, self.since_best[idx] + 1)
        self.total[idx] += 1

    def update(self, gi: torch.Tensor, g: torch.Tensor, cfg: FitConfig) -> None:
        """One AdamW step of the slots ``gi`` with their gradients ``g``."""
        gd = gi.to(self.P.device)
        self.step[gi] += 1
        self.P[gd], self.exp_avg[gd], self.exp_sq[gd] = adamw_rows(self.P[gd], self.exp_avg[gd], self.exp_sq[gd], g,
                                                                   self.step[gi].to(gd.device), cfg)

    def restart(self, s: int, P0: torch.Tensor) -> None:
        """Re-initialise a stuck slot (fresh vectors and moments, schedule from its start; budget not reset)."""
        self.restarts[s] += 1
        self.P[s] = P0
        self.exp_avg[s] = 0
        self.exp_sq[s] = 0
        self.step[s] = 0
        self.since_best[s] = 0


def _idle_step(slm: ShardedLM, mode: str, n_vectors: int, sm: torch.Tensor | None) -> None:
    """A one-position forward and backward through the same modules as a real step, so that this rank serves its
    parameter shards to the ranks still fitting (every gather is a collective)."""
    d = slm.hidden_size
    x = torch.zeros(1, n_vectors, d, device=slm.device, requires_grad=True)
    tgt = torch.zeros(1, 1, dtype=torch.long, device=slm.device)
    tok_prev = slm.embedding(tgt)[:, :-1, :] if mode == "ar" else None
    shared = None if sm is None else sm.view(1, 1, d)
    slm.logits(x.to(slm.dtype), mode, 1, shared_m=shared, tok_prev=tok_prev).sum().backward()


def reference_fit(lm, token_lists: list[list[int]], mode: str, n_vectors: int, cfg: FitConfig,
                  shared_m: torch.Tensor | None = None) -> tuple[list[FitResult], list[list[float]]]:
    """The library's unsharded fitter (``fit_one_step`` / ``fit_ar``, eager) on a whole model, with each text's
    per-step mean CE: what :func:`fit_sharded` must equal. The losses are read by wrapping ``fitting.text_losses``
    for the duration of the call (the fitter reports accuracies only); a step's batch is the texts active before it."""
    import dataclasses

    from . import fitting

    calls: list[torch.Tensor] = []
    real = fitting.text_losses

    def spy(logits, tgt, c):
        out = real(logits, tgt, c)
        calls.append(out[1].detach().double().cpu().clone())
        return out

    active_log = [torch.ones(len(token_lists), dtype=torch.bool)]

    def on_step(step, best_accuracy, active, seconds, best_vectors=None):
        active_log.append(active.clone())

    cfg = dataclasses.replace(cfg, step_mode="eager")
    fitting.text_losses = spy
    try:
        if mode == "one-step":
            res = fitting.fit_one_step(lm, token_lists, cfg, shared_m=shared_m, on_step=on_step)
        else:
            res = fitting.fit_ar(lm, token_lists, n_mem=n_vectors, config=cfg, on_step=on_step)
    finally:
        fitting.text_losses = real
    losses: list[list[float]] = [[] for _ in token_lists]
    for s, plain in enumerate(calls):
        for j, i in enumerate(active_log[s].nonzero().flatten().tolist()):
            losses[i].append(float(plain[j]))
    return res, losses
