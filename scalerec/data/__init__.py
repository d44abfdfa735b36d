"""Interaction readers, splits and batching."""
from scalerec.data.dataset import EvalSet, SeqDataset, build_dataset, load_dataset
from scalerec.data.readers import DataError, Interactions, read_interactions

__all__ = ["DataError", "EvalSet", "Interactions", "SeqDataset", "build_dataset", "load_dataset", "read_interactions"]
