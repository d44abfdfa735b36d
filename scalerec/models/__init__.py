"""Sequence encoders and item tables (a local dense table lives in the model; ``ShardedItemTable`` row-shards it)."""
from scalerec.models.build import build_model
from scalerec.models.sasrec import SASRec

__all__ = ["SASRec", "build_model"]
