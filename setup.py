"""Build the C++ extension ``scalerec._C``.

CPU kernels (``csrc/cpu/*.cpp``) are always compiled with OpenMP. CUDA kernels
(``csrc/cuda/*.cu``) are compiled only when the installed torch has CUDA and a
CUDA toolkit is found; otherwise they are skipped here, at build time.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover
    sys.exit("scalerec: build with `pip install --no-build-isolation -e .` after installing torch")

here = os.path.dirname(os.path.abspath(__file__))
cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))

with_cuda = (
    os.environ.get("SCALEREC_NO_CUDA", "0") != "1"
    and torch.version.cuda is not None
    and CUDA_HOME is not None
    and bool(cuda_sources)
)

cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
define_macros = []
if with_cuda:
    define_macros.append(("WITH_CUDA", None))
    ext = CUDAExtension(
        "scalerec._C",
        cpu_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-std=c++20", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
    )
else:
    print("scalerec: building CPU kernels only (no CUDA torch / toolkit)", file=sys.stderr)
    ext = CppExtension(
        "scalerec._C",
        cpu_sources,
        extra_compile_args=cxx_flags,
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
    )

# The Makefile builds the extension in place (`setup.py build_ext --inplace`, incremental with ninja) and
# installs the package with SCALEREC_SKIP_EXT=1 so the slow C++ build does not run twice.
ext_modules = [] if os.environ.get("SCALEREC_SKIP_EXT") == "1" else [ext]
setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
