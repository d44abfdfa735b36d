"""How fitted vectors become the frozen LM's input: the one place both the fitters and the decoders build it.

A causal LM's first position is an *attention sink*: its output barely depends on its input (massive
activations), so a fitted vector placed there cannot make position 0 predict a chosen token. Measured on
SmolLM2-135M: without a sink, one-step fits of 8- and 16-token passages stall with exactly position 0 wrong
(docs/llm.md). So every input starts with the embedding of a fixed token (``LoadedLM.sink_id``, the
tokenizer's BOS token by default); its logits are dropped. It is the same for every text, so a text is still
only its fitted vectors.
"""
from __future__ import annotations

import torch

from .model import LoadedLM


def n_sink(lm: LoadedLM) -> int:
    """Positions in front of the fitted vectors (0 or 1); their logits are not predictions."""
    return 0 if lm.sink_id is None else 1


def with_sink(lm: LoadedLM, x: torch.Tensor) -> torch.Tensor:
    """``x`` [B, T, d] with the sink token's embedding in front (unchanged when the LM has no sink)."""
    if lm.sink_id is None:
        return x
    s = lm.embedding.weight[lm.sink_id].to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, x.shape[-1])
    return torch.cat([s, x], dim=1)


def one_step_inputs(lm: LoadedLM, e: torch.Tensor, m: torch.Tensor, L: int) -> torch.Tensor:
    """[sink,] e, m × (L - 1) for e, m of shape [B, 1, d]; the logits of the last L positions predict the text."""
    B, _, d = e.shape
    return with_sink(lm, torch.cat([e, m.expand(B, L - 1, d)], dim=1))


def one_step_logits(lm: LoadedLM, e: torch.Tensor, m: torch.Tensor, L: int) -> torch.Tensor:
    """[B, L, vocab]: position i predicts token i of the text, from ONE forward pass."""
    return lm.model(inputs_embeds=one_step_inputs(lm, e, m, L), use_cache=False).logits[:, n_sink(lm):, :]
