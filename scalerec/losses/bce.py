"""BCE with one uniform negative per position (the original SASRec loss)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from scalerec.losses.registry import register_loss, sample_uniform_negatives
from scalerec.ops import gather_dot


@register_loss("bce")
def bce_loss(hidden, table, targets):
    """-log σ(s_pos) - log(1 - σ(s_neg)) per position, one uniform negative, averaged over positions."""
    C = table.size(0) - 1
    neg_ids = sample_uniform_negatives((hidden.size(0), 1), C, hidden.device)
    logits = gather_dot(hidden, table, torch.cat([targets.unsqueeze(1), neg_ids], dim=1))
    return -(F.logsigmoid(logits[:, 0]) + F.logsigmoid(-logits[:, 1])).mean()
