"""Python face of the C++/CUDA extension (``csrc/``): autograd-registered ops and pure-PyTorch references."""
from scalerec.ops.gather_dot import gather_dot, gather_dot_reference
from scalerec.ops.blockwise_ce import blockwise_ce, blockwise_ce_reference  # noqa: F401
from scalerec.ops.bucket_topk import bucket_topk, bucket_topk_reference  # noqa: F401
from scalerec.ops.bucket_ce import bucket_ce, bucket_ce_reference  # noqa: F401
from scalerec.ops.chunk_ce import bucket_argmax, chunk_ce, chunk_ce_reference  # noqa: F401
from scalerec.ops.sparse_grad import sparse_linear, sparsegrad_rotated_update_, sparsegrad_topk_grad  # noqa: F401

__all__ = ["gather_dot", "gather_dot_reference"]
