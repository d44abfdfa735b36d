"""Fitting input embeddings of a frozen causal LM so that it reproduces given texts.

Two modes share one batched fitter:

* **one-step** (Mezentsev & Oseledets, 2025): per text two vectors ``e`` and ``m``; the model reads
  ``[e, m, m, …, m]`` (one position per target token) and position ``i``'s logits predict token ``i``:
  the whole text comes out of ONE forward pass + argmax. With a *shared* ``m`` only ``e`` is fitted.
* **ar** (Kuratov et al., 2025): ``n_mem`` vectors ``[mem]`` are prepended to the teacher-forced text;
  decoding is greedy generation from the vectors alone.

Batching: the trainable vectors of B texts form one ``[B, n_vectors, d]`` tensor; each step runs the
*active* texts only (right-padded to the longest active one; causal attention means padding never
reaches a real position), with a per-text loss (mean CE over its own tokens) summed over texts, a
per-text gradient-norm clip, a per-text learning-rate schedule and a per-text AdamW state. So a text's
update never depends on the other texts in the batch; a text leaves the batch when its token accuracy
reaches ``target_accuracy`` (its vectors stop changing) or its step budget runs out, and the best state
seen (highest accuracy, then lowest loss) is what is returned.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from .fit_config import (FitConfig, FitResult, _check_tokens, initial_vectors, padded_targets,  # noqa: F401
                         restart_patience_for, restart_vectors)
from .fit_step import adamw_rows, fit_logits, text_losses
from .model import LoadedLM
from .static_fit import fit_static


# ----------------------------------------------------------------------------------------------
# the batched fitter

def _fit(lm: LoadedLM, token_lists: list[list[int]], n_vectors: int, mode: str, cfg: FitConfig,
         shared_m: torch.Tensor | None = None, init: torch.Tensor | None = None,
         record_history: bool = False, progress=None, on_step=None) -> list[FitResult]:
    """The fit of ``cfg``, then (``cfg.polish_steps``) the margin-loss polish of the texts it left short."""
    res = _fit_once(lm, token_lists, n_vectors, mode, cfg, shared_m=shared_m, init=init,
                    record_history=record_history, progress=progress, on_step=on_step)
    short = [j for j, r in enumerate(res) if r.accuracy < cfg.target_accuracy
             and (cfg.polish_max_wrong is None or wrong_tokens(r) <= cfg.polish_max_wrong)]
    if not cfg.polish_steps or not short:
        return res
    pcfg = polish_config(cfg)
    sub_on_step = None
    if on_step is not None:  # report the whole batch: the polished texts' state, the others' results
        full_v = torch.stack([r.vectors for r in res]).to(lm.device)
        full_acc = torch.tensor([r.accuracy for r in res])
        idx = torch.tensor(short)

        def sub_on_step(step, best_accuracy, active, seconds, best_vectors=None):
            full_acc[idx] = best_accuracy.cpu().to(full_acc.dtype)
            act = torch.zeros(len(res), dtype=torch.bool)
            act[idx] = active.cpu()
            if best_vectors is not None:
                full_v[idx.to(lm.device)] = best_vectors.to(full_v.dtype)
            on_step(step=step, best_accuracy=full_acc.clone(), active=act, seconds=seconds, best_vectors=full_v)
    # progress was told of these texts when the first fit ended: the polish does not report them again
    pol = _fit_once(lm, [token_lists[j] for j in short], n_vectors, mode, pcfg, shared_m=shared_m,
                    init=torch.stack([res[j].vectors for j in short]), record_history=record_history,
                    on_step=sub_on_step)
    for j, p in zip(short, pol):
        r = res[j]
        keep = p if p.accuracy > r.accuracy else r
        res[j] = FitResult(vectors=keep.vectors, token_ids=r.token_ids, accuracy=keep.accuracy,
                           steps=r.steps + p.steps, seconds=r.seconds + p.seconds, loss=keep.loss,
                           restarts=r.restarts, history=r.history + p.history)
    return res


def wrong_tokens(r: FitResult) -> int:
    """How many of the text's tokens its best state gets wrong (from its token accuracy)."""
    return int(round((1.0 - r.accuracy) * r.n_tokens))


def polish_config(cfg: FitConfig) -> FitConfig:
    """The polishing fit's settings (see ``FitConfig.polish_steps``): the margin loss at ``polish_tau`` and
    ``polish_lr`` for ``polish_steps`` steps, no warm-up, no restarts, no stages; the rest as in ``cfg``."""
    return dataclasses.replace(cfg, max_steps=cfg.polish_steps, margin_tau=cfg.polish_tau, lr=cfg.polish_lr,
                               warmup_steps=0, restart_patience=0, grow_from=None, polish_steps=0,
                               polish_max_wrong=None)


def _fit_once(lm: LoadedLM, token_lists: list[list[int]], n_vectors: int, mode: str, cfg: FitConfig,
              shared_m: torch.Tensor | None = None, init: torch.Tensor | None = None,
              record_history: bool = False, progress=None, on_step=None) -> list[FitResult]:
    """The fitter for ``cfg.step_mode``: the eager loop, or the fixed-shape step (scalerec/llm/static_fit.py)."""
    sm = cfg.step_mode
    if sm == "auto":
        sm = "graph" if lm.device.type == "cuda" and not record_history else "eager"
    if sm == "eager":
        return _fit_eager(lm, token_lists, n_vectors, mode, cfg, shared_m=shared_m, init=init,
                          record_history=record_history, progress=progress, on_step=on_step)
    if record_history:
        raise ValueError(f"record_history needs step_mode 'eager' (the {sm!r} step reports every sync_every steps)")
    if sm == "graph" and lm.device.type != "cuda":
        raise ValueError(f"step_mode 'graph' needs a CUDA device, the model is on {lm.device}")
    return fit_static(lm, token_lists, n_vectors, mode, cfg, shared_m=shared_m, init=init, progress=progress,
                      on_step=on_step, capture=sm == "graph")


def _fit_eager(lm: LoadedLM, token_lists: list[list[int]], n_vectors: int, mode: str, cfg: FitConfig,
               shared_m: torch.Tensor | None = None, init: torch.Tensor | None = None,
               record_history: bool = False, progress=None, on_step=None) -> list[FitResult]:
    dev, dt = lm.device, lm.dtype
    B = len(token_lists)
    extra = n_vectors if mode == "ar" else 0
    _check_tokens(lm, token_lists, extra)
    d = lm.hidden_size
    lengths, targets = padded_targets(token_lists)
    emb = lm.embedding
    # parameters and optimiser state, kept in float32 on the model's device
    P = initial_vectors(lm, token_lists, n_vectors, cfg, init)
    exp_avg = torch.zeros_like(P)
    exp_sq = torch.zeros_like(P)
    step = torch.zeros(B, dtype=torch.long)          # optimiser steps taken since the last (re)start
    total = torch.zeros(B, dtype=torch.long)         # forward passes spent on the text
    best_acc = torch.full((B,), -1.0)
    best_loss = torch.full((B,), float("inf"))
    best_P = P.clone()
    since_best = torch.zeros(B, dtype=torch.long)
    restarts = torch.zeros(B, dtype=torch.long)
    active = torch.ones(B, dtype=torch.bool)
    seconds = torch.zeros(B, dtype=torch.float64)
    histories: list[list[float]] = [[] for _ in range(B)]
    sm = None if shared_m is None else shared_m.detach().to(dev, dt).view(d)
    targets_dev = targets.to(dev)
    patience = [restart_patience_for(cfg, len(t)) for t in token_lists]  # all None when restarts are off
    patience = None if None in patience else torch.tensor(patience, dtype=torch.long)

    it = 0
    while bool(active.any()):
        it += 1
        t0 = time.perf_counter()
        idx = active.nonzero().flatten()
        L = int(lengths[idx].max())
        tgt = targets_dev[idx.to(dev), :L]
        x = P[idx.to(dev)].clone().requires_grad_(True)
        xin = x.to(dt)
        tok_prev = emb(tgt.clamp(min=0))[:, :-1, :] if mode == "ar" else None
        shared = None if sm is None else sm.view(1, 1, d).expand(len(idx), 1, d)
        logits = fit_logits(lm, xin, mode, L, shared_m=shared, tok_prev=tok_prev)
        loss_per, plain, acc = text_losses(logits, tgt, cfg)
        loss_per.sum().backward()
        with torch.no_grad():
            acc = acc.cpu()
            lossc = plain.float().cpu()
            g = x.grad.detach().float()
            # best state (evaluated before this step's update)
            better = (acc > best_acc[idx]) | ((acc == best_acc[idx]) & (lossc < best_loss[idx]))
            improved_acc = acc > best_acc[idx]
            if bool(better.any()):
                bi = idx[better]
                best_P[bi.to(dev)] = P[bi.to(dev)]
                best_acc[bi] = acc[better]
                best_loss[bi] = lossc[better]
            since_best[idx] = torch.where(improved_acc, torch.zeros_like(since_best[idx]), since_best[idx] + 1)
            total[idx] += 1
            for j, i in enumerate(idx.tolist()):
                if record_history:
                    histories[i].append(float(acc[j]))
            done = (acc >= cfg.target_accuracy) | (total[idx] >= cfg.max_steps)
            # AdamW update of the texts that go on
            go = ~done
            if bool(go.any()):
                gi = idx[go]
                gd = gi.to(dev)
                step[gi] += 1
                P[gd], exp_avg[gd], exp_sq[gd] = adamw_rows(P[gd], exp_avg[gd], exp_sq[gd], g[go.to(dev)],
                                                            step[gi].to(dev), cfg)
                if patience is not None:
                    stuck = gi[since_best[gi] >= patience[gi]]
                    for i in stuck.tolist():
                        restarts[i] += 1
                        P[i] = restart_vectors(lm, cfg, token_lists[i], int(restarts[i]), n_vectors,
                                               None if init is None else init.view(B, n_vectors, d)[i]).to(dev)
                        exp_avg[i] = 0
                        exp_sq[i] = 0
                        step[i] = 0
                        since_best[i] = 0
        dt_step = time.perf_counter() - t0
        # charge the step's time to the texts in it, in proportion to their token counts
        share = lengths[idx].double() / lengths[idx].double().sum()
        seconds[idx] += dt_step * share
        fin = idx[done]
        active[fin] = False
        if progress is not None:
            progress(n_done=int(len(fin)), tokens=int(lengths[fin].sum()), n_active=int(active.sum()))
        if on_step is not None:
            on_step(step=it, best_accuracy=best_acc.clone(), active=active.clone(), seconds=dt_step,
                    best_vectors=best_P)

    out = []
    for i, toks in enumerate(token_lists):
        out.append(FitResult(vectors=best_P[i].detach().float().cpu().clone(), token_ids=list(toks),
                             accuracy=float(best_acc[i]), steps=int(total[i]), seconds=float(seconds[i]),
                             loss=float(best_loss[i]), restarts=int(restarts[i]), history=histories[i]))
    return out


def prefix_stages(n_tokens: int, grow_from: int | None) -> list[int]:
    """Prefix lengths of a growing fit: ``grow_from``, doubled while shorter than ``n_tokens``, then ``n_tokens``."""
    if not grow_from or n_tokens <= grow_from:
        return [n_tokens]
    out, n = [], int(grow_from)
    while n < n_tokens:
        out.append(n)
        n *= 2
    return out + [n_tokens]


def _fit_growing(lm: LoadedLM, token_lists: list[list[int]], n_vectors: int, mode: str, cfg: FitConfig,
                 shared_m: torch.Tensor | None = None, init: torch.Tensor | None = None,
                 record_history: bool = False, progress=None, on_step=None) -> list[FitResult]:
    """``_fit`` through growing prefixes (``cfg.grow_from``): stage s fits every text's first ``L_s`` tokens
    (all of it when shorter), warm-started from its vectors of stage s - 1. Both modes read the text causally, so
    vectors that reproduce a prefix are already a partial solution for the longer text. A text takes part in the
    stages up to the first that covers it whole; its result sums the steps, seconds and restarts of its stages
    and keeps the last stage's vectors, accuracy and loss. ``max_steps`` applies to each stage."""
    stages = prefix_stages(max(len(t) for t in token_lists), cfg.grow_from)
    if len(stages) == 1:  # _fit checks the texts itself
        return _fit(lm, token_lists, n_vectors, mode, cfg, shared_m=shared_m, init=init,
                    record_history=record_history, progress=progress, on_step=on_step)
    _check_tokens(lm, token_lists, n_vectors if mode == "ar" else 0)  # the whole texts, before the short stages
    B, d = len(token_lists), lm.hidden_size
    vecs = None if init is None else init.detach().float().cpu().reshape(B, n_vectors, d).clone()
    results: list[FitResult | None] = [None] * B
    prev = 0
    for L in stages:
        part = [i for i, t in enumerate(token_lists) if len(t) > prev]
        if not part:
            break
        start = None if vecs is None else vecs[part]  # None: the first stage initialises as _fit does
        res = _fit(lm, [token_lists[i][:L] for i in part], n_vectors, mode, cfg, shared_m=shared_m, init=start,
                   record_history=record_history, on_step=on_step)
        if vecs is None:
            vecs = torch.zeros(B, n_vectors, d)
        for i, r in zip(part, res):
            vecs[i] = r.vectors
            old = results[i]
            if old is not None:
                r.steps += old.steps
                r.seconds += old.seconds
                r.restarts += old.restarts
                r.history = old.history + r.history
            r.token_ids = list(token_lists[i])
            results[i] = r
        if progress is not None:
            fin = [i for i in part if len(token_lists[i]) <= L]
            progress(n_done=len(fin), tokens=sum(len(token_lists[i]) for i in fin),
                     n_active=sum(len(t) > L for t in token_lists))
        prev = L
    return results


def _as_token_lists(lm: LoadedLM, texts) -> list[list[int]]:
    if isinstance(texts, str):
        texts = [texts]
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            if not t.strip():
                raise ValueError(f"text {i}: empty")
            out.append(lm.encode(t))
        else:
            out.append([int(v) for v in t])
    return out


def fit_one_step(lm: LoadedLM, texts, config: FitConfig | None = None, shared_m: torch.Tensor | None = None,
                 init: torch.Tensor | None = None, record_history: bool = False, progress=None,
                 on_step=None) -> list[FitResult]:
    """Fit ``[e, m]`` per text (or ``[e]`` with a given ``shared_m``) for one-step decoding.

    ``texts``: strings or lists of token ids (one-step fitting reproduces exactly these ids). ``progress(n_done,
    tokens, n_active)`` is called with the texts finished (after every step; after every stage with ``grow_from``);
    ``on_step(step, best_accuracy, active, seconds, best_vectors)`` after every step of every stage (steps counted
    from 1 in each), with each text's best token accuracy so far, the step's seconds (for a log) and the best
    vectors so far ([B, n_vectors, d] on the model's device, the fitter's own tensor: copy what you keep), e.g. to
    save a long fit's progress before it ends.
    """
    cfg = config or FitConfig()
    toks = _as_token_lists(lm, texts)
    n = 1 if shared_m is not None else 2
    return _fit_growing(lm, toks, n, "one-step", cfg, shared_m=shared_m, init=init, record_history=record_history,
                        progress=progress, on_step=on_step)


def fit_ar(lm: LoadedLM, texts, n_mem: int = 1, config: FitConfig | None = None, init: torch.Tensor | None = None,
           record_history: bool = False, progress=None, on_step=None) -> list[FitResult]:
    """Fit ``n_mem`` [mem] vectors per text, prepended to the teacher-forced text (autoregressive decoding);
    ``progress`` and ``on_step`` as in :func:`fit_one_step`."""
    cfg = config or FitConfig()
    toks = _as_token_lists(lm, texts)
    return _fit_growing(lm, toks, n_mem, "ar", cfg, init=init, record_history=record_history, progress=progress,
                        on_step=on_step)
