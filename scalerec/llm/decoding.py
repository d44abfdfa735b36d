"""Regenerating texts from fitted vectors."""
from __future__ import annotations

import inspect

import torch

from .inputs import one_step_logits, with_sink
from .model import LoadedLM


def _as_batch(vectors, d: int) -> torch.Tensor:
    if isinstance(vectors, (list, tuple)):
        vectors = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in vectors])
    v = torch.as_tensor(vectors, dtype=torch.float32)
    if v.dim() == 2:
        v = v.unsqueeze(0)
    if v.dim() != 3 or v.shape[-1] != d:
        raise ValueError(f"vectors must be [n, {d}] or [B, n, {d}], got {tuple(v.shape)}")
    return v


@torch.no_grad()
def decode_one_step(lm: LoadedLM, vectors, lengths, shared_m: torch.Tensor | None = None) -> list[list[int]]:
    """Token ids from ``[e, m]`` (or ``[e]`` with ``shared_m``) in ONE forward pass over the batch.

    ``vectors``: ``[n, d]`` or ``[B, n, d]``; ``lengths``: an int or one int per text.
    """
    d = lm.hidden_size
    v = _as_batch(vectors, d)
    B = v.shape[0]
    lens = [int(lengths)] * B if isinstance(lengths, int) else [int(x) for x in lengths]
    if len(lens) != B:
        raise ValueError(f"{B} vector sets but {len(lens)} lengths")
    L = max(lens)
    e = v[:, 0:1, :]
    if shared_m is not None:
        m = torch.as_tensor(shared_m, dtype=torch.float32).view(1, 1, d).expand(B, 1, d)
    else:
        if v.shape[1] < 2:
            raise ValueError("one-step vectors need [e, m] (or pass shared_m)")
        m = v[:, 1:2, :]
    ids = one_step_logits(lm, e.to(lm.device, lm.dtype), m.to(lm.device, lm.dtype), L).argmax(-1).cpu()
    return [ids[i, : lens[i]].tolist() for i in range(B)]


@torch.no_grad()
def decode_ar(lm: LoadedLM, vectors, lengths) -> list[list[int]]:
    """Greedy generation of ``lengths`` tokens from the [mem] vectors alone (KV-cached, batched)."""
    d = lm.hidden_size
    v = _as_batch(vectors, d).to(lm.device, lm.dtype)
    B = v.shape[0]
    lens = [int(lengths)] * B if isinstance(lengths, int) else [int(x) for x in lengths]
    if len(lens) != B:
        raise ValueError(f"{B} vector sets but {len(lens)} lengths")
    L = max(lens)
    emb = lm.embedding
    # transformers 5 renamed `past_key_values` to `cache`; accept both
    key = "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"
    out = lm.model(inputs_embeds=with_sink(lm, v), use_cache=True)
    nxt = out.logits[:, -1, :].argmax(-1)
    ids = [nxt]
    for _ in range(L - 1):
        past = getattr(out, "cache", None) or out.past_key_values
        out = lm.model(inputs_embeds=emb(nxt).unsqueeze(1), use_cache=True, **{key: past})
        nxt = out.logits[:, -1, :].argmax(-1)
        ids.append(nxt)
    allids = torch.stack(ids, dim=1).cpu()
    return [allids[i, : lens[i]].tolist() for i in range(B)]


def decode(lm: LoadedLM, vectors, lengths, mode: str = "one-step", shared_m=None) -> list[list[int]]:
    """``decode(vectors, length)``: one forward pass in one-step mode, greedy generation in ar mode."""
    if mode == "one-step":
        return decode_one_step(lm, vectors, lengths, shared_m=shared_m)
    if mode == "ar":
        return decode_ar(lm, vectors, lengths)
    raise ValueError(f"unknown mode {mode!r}: 'one-step' or 'ar'")
