"""``build_model``: the SASRec of a config (the ``model`` section)."""
from __future__ import annotations

from scalerec.models.sasrec import SASRec


def build_model(cfg, num_items: int, item_table: bool = True) -> SASRec:
    """SASRec per ``cfg.model``; ``item_table=False`` for the dense part only (a row-sharded table serves rows)."""
    m = cfg.model if hasattr(cfg, "model") else cfg["model"]
    return SASRec(num_items, maxlen=int(m["maxlen"]), hidden=int(m["hidden"]), num_blocks=int(m["num_blocks"]),
                  num_heads=int(m["num_heads"]), dropout=float(m["dropout"]), item_table=item_table)
