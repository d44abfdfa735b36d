"""Python face of the C++/CUDA extension (``csrc/``): autograd-registered ops and pure-PyTorch references."""
from scalerec.ops.gather_dot import gather_dot, gather_dot_reference

__all__ = ["gather_dot", "gather_dot_reference"]
