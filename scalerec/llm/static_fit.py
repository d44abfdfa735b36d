"""The fitter's step at fixed shapes, so that a GPU can replay it as one CUDA graph.

The eager fitter (``scalerec.llm.fitting``) runs only the active texts each step and reads every text's accuracy
back to the host, so its tensors change shape and the host waits on the device every step. On a GPU that step is
a few thousand small kernel launches, and the launches, not the arithmetic, set its time (0.12 s a step on an H100
for four 80-token texts, docs/llm.md). Here every step runs ALL texts of the batch at the padded length, and what
the eager loop decides on the host is a mask on the device:

* ``live`` = not finished and not waiting for a restart: only live texts count the step, update their best state
  and take an AdamW step (masked with ``torch.where``, so a finished text's vectors never change);
* a live text finishes when its accuracy reaches the target or its budget runs out, exactly as in the eager loop;
* a text whose best accuracy has not improved for ``restart_patience`` steps is marked *waiting*: it sits out the
  following steps (no step counted) until the host re-initialises it at its next look, every ``sync_every``
  steps. So its trajectory is the eager one, only later in wall time.

The step's arithmetic is the eager loop's own (``fit_step.py``: logits, losses, AdamW), and only the bookkeeping
around it differs (``tests/test_llm_static.py`` compares the two fits). The
batch is never compacted: texts that finished early still ride along (masked) until the last one ends, which costs
arithmetic but no launches. ``capture=True`` records one step in a CUDA graph after three eager warm-up steps (real
steps of the fit) and replays it; if capturing fails (an op of the model that syncs with the host), the fit goes
on with the same step uncaptured and says so in a warning.
"""
from __future__ import annotations

import time
import warnings

import torch

from .fit_config import FitConfig, FitResult, _check_tokens, initial_vectors, padded_targets, \
    restart_patience_for, restart_vectors
from .fit_step import adamw_rows, fit_logits, text_losses
from .model import LoadedLM

WARMUP_STEPS = 3  # eager steps on a side stream before capturing (CUDA graphs need the allocator warmed up)


def fit_static(lm: LoadedLM, token_lists: list[list[int]], n_vectors: int, mode: str, cfg: FitConfig,
               shared_m: torch.Tensor | None = None, init: torch.Tensor | None = None, progress=None,
               on_step=None, capture: bool = False) -> list[FitResult]:
    """Fit all texts together at fixed shapes (see the module docstring); ``on_step`` and ``progress`` are called
    every ``cfg.sync_every`` steps, ``on_step``'s ``step`` counting the steps so far and ``seconds`` the time since
    its last call."""
    dev, dt = lm.device, lm.dtype
    B = len(token_lists)
    _check_tokens(lm, token_lists, n_vectors if mode == "ar" else 0)
    d = lm.hidden_size
    lengths, targets = padded_targets(token_lists)
    L = int(lengths.max())
    tgt = targets.to(dev)
    P = initial_vectors(lm, token_lists, n_vectors, cfg, init)
    exp_avg = torch.zeros_like(P)
    exp_sq = torch.zeros_like(P)
    step = torch.zeros(B, dtype=torch.long, device=dev)        # optimiser steps since the last (re)start
    total = torch.zeros(B, dtype=torch.long, device=dev)       # steps the text has counted
    best_acc = torch.full((B,), -1.0, device=dev)
    best_loss = torch.full((B,), float("inf"), device=dev)
    best_P = P.clone()
    since_best = torch.zeros(B, dtype=torch.long, device=dev)
    go = torch.ones(B, dtype=torch.bool, device=dev)          # not finished
    wait = torch.zeros(B, dtype=torch.bool, device=dev)       # waiting for the host to re-initialise it
    restarts = [0] * B
    seconds = torch.zeros(B, dtype=torch.float64)
    patience = [restart_patience_for(cfg, len(t)) for t in token_lists]
    patience = None if None in patience else torch.tensor(patience, dtype=torch.long, device=dev)
    sm = None if shared_m is None else shared_m.detach().to(dev, dt).view(1, 1, d).expand(B, 1, d)
    tok_prev = None
    if mode == "ar":  # the teacher-forced token embeddings (frozen): the same every step
        with torch.no_grad():
            tok_prev = lm.embedding(tgt.clamp(min=0))[:, :-1, :]

    def one_step():
        x = P.detach().requires_grad_(True)
        logits = fit_logits(lm, x.to(dt), mode, L, shared_m=sm, tok_prev=tok_prev)
        loss_per, plain, acc = text_losses(logits, tgt, cfg)
        (g,) = torch.autograd.grad(loss_per.sum(), x)
        with torch.no_grad():
            live = go & ~wait
            better = live & ((acc > best_acc) | ((acc == best_acc) & (plain < best_loss)))
            improved_acc = acc > best_acc
            best_P.copy_(torch.where(better.view(B, 1, 1), P, best_P))
            best_acc.copy_(torch.where(better, acc, best_acc))
            best_loss.copy_(torch.where(better, plain, best_loss))
            since_best.copy_(torch.where(live, torch.where(improved_acc, 0, since_best + 1), since_best))
            total.add_(live.long())
            done = live & ((acc >= cfg.target_accuracy) | (total >= cfg.max_steps))
            upd = live & ~done
            step.add_(upd.long())
            new_P, ea, es = adamw_rows(P, exp_avg, exp_sq, g, step, cfg)
            u = upd.view(B, 1, 1)
            exp_avg.copy_(torch.where(u, ea, exp_avg))
            exp_sq.copy_(torch.where(u, es, exp_sq))
            P.copy_(torch.where(u, new_P, P))
            if patience is not None:
                wait.logical_or_(upd & (since_best >= patience))
            go.logical_and_(~done)

    run = one_step
    ahead = 0  # steps of the first interval already taken (the warm-up before capturing)
    if capture:
        ahead = min(WARMUP_STEPS, cfg.sync_every)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(ahead):
                one_step()
        torch.cuda.current_stream(dev).wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                one_step()
            run = graph.replay
        except Exception as exc:  # an op of the model that cannot be captured: go on uncaptured
            torch.cuda.synchronize(dev)
            warnings.warn(f"the fitting step could not be captured in a CUDA graph ({type(exc).__name__}: "
                          f"{str(exc)[:300]}); it runs uncaptured (step_mode 'static')", RuntimeWarning)

    it = 0
    t_last = time.perf_counter()
    live_before = torch.ones(B, dtype=torch.bool)   # live at the start of the interval (host copy)
    while True:
        for _ in range(cfg.sync_every - ahead):
            run()
        it += cfg.sync_every
        ahead = 0
        go_h, wait_h = go.cpu(), wait.cpu()  # the host's look: one sync every sync_every steps
        now = time.perf_counter()
        elapsed, t_last = now - t_last, now
        # charge the interval's time to the texts live at its start, in proportion to their token counts
        w = lengths.double() * live_before.double()
        if float(w.sum()) > 0:
            seconds += elapsed * w / w.sum()
        fin = live_before & ~go_h
        for i in wait_h.nonzero().flatten().tolist():
            restarts[i] += 1
            P[i] = restart_vectors(lm, cfg, token_lists[i], restarts[i], n_vectors,
                                   None if init is None else init.view(B, n_vectors, d)[i]).to(dev)
            exp_avg[i] = 0
            exp_sq[i] = 0
            step[i] = 0
            since_best[i] = 0
        wait.zero_()
        live_before = go_h.clone()
        if progress is not None:
            progress(n_done=int(fin.sum()), tokens=int(lengths[fin].sum()), n_active=int(go_h.sum()))
        if on_step is not None:
            on_step(step=it, best_accuracy=best_acc.cpu(), active=go_h.clone(), seconds=elapsed, best_vectors=best_P)
        if not bool(go_h.any()):
            break

    best_acc_h, best_loss_h, total_h = best_acc.cpu(), best_loss.cpu(), total.cpu()
    return [FitResult(vectors=best_P[i].detach().float().cpu().clone(), token_ids=list(toks),
                      accuracy=float(best_acc_h[i]), steps=int(total_h[i]), seconds=float(seconds[i]),
                      loss=float(best_loss_h[i]), restarts=restarts[i])
            for i, toks in enumerate(token_lists)]
