"""Sequence encoders and item tables."""
from scalerec.models.sasrec import SASRec

__all__ = ["SASRec"]
