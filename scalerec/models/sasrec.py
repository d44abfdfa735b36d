"""SASRec (Kang & McAuley 2018) as used in the SCE / RECE papers.

Learned positional embeddings, causal self-attention blocks (pre-LayerNorm attention, point-wise
feed-forward, residuals, dropout), one item embedding shared between input and output. Sequences are
left-padded with 0; positions are counted from the right edge of a ``maxlen`` window, so a batch trimmed
to its longest sequence gives the same output as the full-width one.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Block(nn.Module):
    def __init__(self, hidden: int, num_heads: int, dropout: float):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"model.hidden ({hidden}) must be divisible by model.num_heads ({num_heads})")
        self.num_heads = num_heads
        self.ln_attn = nn.LayerNorm(hidden, eps=1e-8)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ln_ffn = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn1 = nn.Linear(hidden, hidden)
        self.ffn2 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.p = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        h = self.ln_attn(x)
        q, k, v = self.qkv(h).view(B, L, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.p if self.training else 0.0)
        a = self.out(a.transpose(1, 2).reshape(B, L, d))
        x = h + self.dropout(a)  # SASRec adds the attention output to the normalised query
        h = self.ln_ffn(x)
        f = self.ffn2(self.dropout(F.relu(self.ffn1(h))))
        return h + self.dropout(f)


class SASRec(nn.Module):
    def __init__(self, num_items: int, maxlen: int = 200, hidden: int = 64, num_blocks: int = 2,
                 num_heads: int = 1, dropout: float = 0.3, item_table: bool = True):
        """``item_table=False``: no item embedding of its own; ``encode`` then needs ``item_embeddings`` (the rows a
        row-sharded table fetched), and the module holds only the dense part (blocks, positions, norms)."""
        super().__init__()
        for name, v in (("num_items", num_items), ("maxlen", maxlen), ("hidden", hidden),
                        ("num_blocks", num_blocks), ("num_heads", num_heads)):
            if int(v) <= 0:
                raise ValueError(f"model.{name} must be positive, got {v}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout must lie in [0, 1), got {dropout}")
        self.num_items, self.maxlen, self.hidden = num_items, maxlen, hidden
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0) if item_table else None
        self.pos_emb = nn.Embedding(maxlen, hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(hidden, num_heads, dropout) for _ in range(num_blocks))
        self.final_ln = nn.LayerNorm(hidden, eps=1e-8)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        if self.item_emb is not None:
            with torch.no_grad():
                self.item_emb.weight[0].zero_()

    @property
    def item_table(self) -> torch.Tensor:
        if self.item_emb is None:
            raise AttributeError("this SASRec has no item table of its own (its rows come from a row-sharded table)")
        return self.item_emb.weight

    def encode(self, seqs: torch.Tensor, item_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[B, L, d]`` for left-padded item ids ``[B, L]`` (L <= maxlen).

        ``item_embeddings`` (``[B, L, d]``) replaces the lookup ``item_emb(seqs)`` — a row-sharded table
        supplies the rows it fetched from their owners this way.
        """
        B, L = seqs.shape
        if L > self.maxlen:
            raise ValueError(f"sequence width {L} exceeds model.maxlen {self.maxlen}; truncate on the left")
        pad = seqs == 0
        if item_embeddings is None and self.item_emb is None:
            raise ValueError("SASRec without an item table: pass item_embeddings (the rows of seqs)")
        x = self.item_emb(seqs) if item_embeddings is None else item_embeddings
        x = x * math.sqrt(self.hidden)
        pos = torch.arange(self.maxlen - L, self.maxlen, device=seqs.device)
        x = x + self.pos_emb(pos).unsqueeze(0)
        x = self.emb_dropout(x) * (~pad).unsqueeze(-1)
        # causal mask; padding keys are hidden, but every position may attend to itself (no empty rows)
        causal = torch.ones(L, L, dtype=torch.bool, device=seqs.device).tril()
        mask = causal.unsqueeze(0) & ~pad.unsqueeze(1)
        mask = mask | torch.eye(L, dtype=torch.bool, device=seqs.device).unsqueeze(0)
        mask = mask.unsqueeze(1)  # [B, 1, L, L]
        for block in self.blocks:
            x = block(x, mask) * (~pad).unsqueeze(-1)
        return self.final_ln(x)

    def forward(self, seqs: torch.Tensor, item_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(seqs, item_embeddings)

    def last_hidden(self, seqs: torch.Tensor) -> torch.Tensor:
        """The state at the last (most recent) position of each left-padded sequence: ``[B, d]``."""
        return self.encode(seqs)[:, -1]
