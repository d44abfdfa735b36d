"""scalerec: huge-softmax training (SCE / RECE sequential recommenders), frozen-LLM embedding fitting, SparseGrad."""

__version__ = "0.1.0"
