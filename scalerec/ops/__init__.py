"""Python face of the C++/CUDA extension (``csrc/``): autograd-registered ops and pure-PyTorch references."""
from scalerec.ops.gather_dot import gather_dot, gather_dot_reference
from scalerec.ops.sparse_grad import sparse_linear, sparsegrad_rotated_update_, sparsegrad_topk_grad  # noqa: F401

__all__ = ["gather_dot", "gather_dot_reference"]
