"""A shared (universal) ``m`` per model: fitted jointly with per-text ``e`` on a corpus, then frozen.

With the shared ``m`` fixed, a text is ONE vector ``e`` (``fit_one_step(..., shared_m=m)``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fit_config import FitConfig, _check_tokens, _init_vectors, _lr_at, padded_targets
from .inputs import one_step_logits
from .model import LoadedLM


@dataclass
class SharedMResult:
    m: torch.Tensor            # [d] float32 CPU
    e: torch.Tensor            # [B, 1, d] the texts' e at the best state
    accuracies: list[float]    # per text at the best state
    steps: int
    seconds: float

    @property
    def mean_accuracy(self) -> float:
        return sum(self.accuracies) / max(len(self.accuracies), 1)


def fit_shared_m(lm: LoadedLM, token_lists: list[list[int]], config: FitConfig | None = None, steps: int = 400,
                 batch_size: int = 16, seed: int = 0, progress: bool = False) -> SharedMResult:
    """Jointly fit one ``m`` and one ``e`` per text (AdamW on both, per-text loss averaged over the batch).

    The corpus is visited in mini-batches of ``batch_size`` texts (round robin). The returned ``m`` is the one
    with the best mean token accuracy over the corpus (measured on the visited mini-batches of the last pass).
    """
    cfg = config or FitConfig(max_steps=steps, seed=seed)
    _check_tokens(lm, token_lists, 0)
    dev, dt = lm.device, lm.dtype
    B = len(token_lists)
    d = lm.hidden_size
    lengths, targets = padded_targets(token_lists)
    gen = torch.Generator().manual_seed(seed)
    init = _init_vectors(lm, B + 1, cfg, gen)
    e = torch.nn.Parameter(init[:B].view(B, 1, d).clone().to(dev))
    m = torch.nn.Parameter(init[B].clone().to(dev))
    opt = torch.optim.AdamW([e, m], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps)
    acc_now = torch.zeros(B)
    best = (-1.0, m.detach().clone(), e.detach().clone(), acc_now.clone())
    t0 = time.perf_counter()
    n_batches = (B + batch_size - 1) // batch_size
    from tqdm import tqdm

    bar = tqdm(range(steps), desc="shared m", disable=not progress)
    for s in bar:
        bi = (s % n_batches) * batch_size
        idx = torch.arange(bi, min(bi + batch_size, B))
        L = int(lengths[idx].max())
        tgt = targets[idx, :L].to(dev)
        for g in opt.param_groups:
            g["lr"] = float(_lr_at(cfg, torch.tensor([s]))[0])
        x_e = e[idx.to(dev)].to(dt)
        logits = one_step_logits(lm, x_e, m.to(dt).view(1, 1, d).expand(len(idx), 1, d), L).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none",
                             ignore_index=-100).view(len(idx), L)
        mask = tgt != -100
        loss = ((ce * mask).sum(1) / mask.sum(1)).mean()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            acc_now[idx] = (((logits.argmax(-1) == tgt) & mask).sum(1).float() / mask.sum(1).float()).cpu()
        if s % n_batches == n_batches - 1 or n_batches == 1:
            mean = float(acc_now.mean())
            if mean > best[0]:
                best = (mean, m.detach().clone(), e.detach().clone(), acc_now.clone())
            bar.set_postfix(acc=f"{mean:.3f}")
            if mean >= cfg.target_accuracy:
                break
        loss.backward()
        if cfg.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([e, m], cfg.clip_norm * max(1.0, len(idx) ** 0.5))
        opt.step()
    return SharedMResult(m=best[1].float().cpu(), e=best[2].float().cpu(), accuracies=best[3].tolist(),
                         steps=s + 1, seconds=time.perf_counter() - t0)
