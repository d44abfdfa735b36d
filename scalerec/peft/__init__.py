"""Parameter-efficient fine-tuning of transformer MLP blocks: SparseGrad, and the MeProp and LoRA baselines.

SparseGrad (Chekalina et al., EMNLP 2024) rotates each targeted MLP weight into a basis found by an HOSVD of
calibration gradients, where about 1% of the gradient entries carry the signal, and updates only the top-k
entries per step::

    from scalerec.peft import SparseGradConfig, apply_sparsegrad, SparseGradOptimizer, revert_sparsegrad
    apply_sparsegrad(model, SparseGradConfig(density=0.01), calibration_data=batches)
    opt = SparseGradOptimizer(model, lr=1e-4)
    ...
    revert_sparsegrad(model)   # plain nn.Linear layers again
"""
from scalerec.peft.config import (BERT_MLP_TARGETS, LLAMA_MLP_TARGETS, LLAMA_MLP_TARGETS_WITH_GATE, MePropConfig,
                                  SparseGradConfig, find_targets)
from scalerec.peft.layers import SparseGradLinear
from scalerec.peft.lora import apply_lora, matched_lora_rank
from scalerec.peft.sparsegrad import (SparseGradOptimizer, apply_meprop, apply_sparsegrad, calibrate_bases,
                                      count_trainable, freeze_except_head, revert_sparsegrad, sparse_layers)

__all__ = [
    "SparseGradConfig", "MePropConfig", "apply_sparsegrad", "apply_meprop", "revert_sparsegrad", "calibrate_bases",
    "SparseGradLinear", "SparseGradOptimizer", "apply_lora", "matched_lora_rank", "find_targets",
    "freeze_except_head", "count_trainable", "sparse_layers",
    "BERT_MLP_TARGETS", "LLAMA_MLP_TARGETS", "LLAMA_MLP_TARGETS_WITH_GATE",
]
