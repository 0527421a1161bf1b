"""Builds flowformer's one op library, python/flowformer/_C*.so, from the sources in sources.txt.

CPU kernels are always built. CUDA kernels are built whenever nvcc is found (no GPU needed), for
the architectures in TORCH_CUDA_ARCH_LIST (default "8.0;9.0"); if they fail to compile, the build
fails. FLOWFORMER_CUDA=0 asks for a CPU-only build explicitly.

    pip install --no-build-isolation -e .
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def find_cuda_home():
    """The CUDA toolkit root, or None. Resolves wrapper scripts such as /usr/local/bin/nvcc."""
    if os.environ.get("FLOWFORMER_CUDA", "1") == "0":
        return None
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return str(Path(candidate).resolve())
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = Path(nvcc).resolve()
    if nvcc.parent.name == "bin" and (nvcc.parent.parent / "include" / "cuda_runtime.h").exists():
        return str(nvcc.parent.parent)
    return None


CUDA_HOME = find_cuda_home()
import torch  # noqa: E402

if CUDA_HOME is not None and torch.version.cuda is None:
    print(f"flowformer: nvcc found at {CUDA_HOME}, but torch {torch.__version__} is a CPU-only build: "
          "building WITHOUT CUDA kernels", file=sys.stderr)
    CUDA_HOME = None
if CUDA_HOME is not None:
    os.environ["CUDA_HOME"] = CUDA_HOME  # read by torch.utils.cpp_extension at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def sources():
    lines = (ROOT / "sources.txt").read_text().splitlines()
    files = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    cpp = [f for f in files if f.endswith(".cpp")]
    cuda = [f for f in files if f.endswith(".cu")]
    return cpp, cuda


def extension():
    cpp, cuda = sources()
    include_dirs = [str(ROOT / "csrc"), str(ROOT / "csrc" / "include"), str(ROOT / "kernels")]
    cxx_flags = ["-O3", "-fopenmp-simd", "-fvisibility-inlines-hidden"]
    if CUDA_HOME is None:
        return CppExtension("flowformer._C", cpp, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags}, py_limited_api=True)
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension("flowformer._C", cpp + cuda, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx_flags + ["-DFLOWFORMER_WITH_CUDA=1"],
                                             "nvcc": nvcc_flags + ["-DFLOWFORMER_WITH_CUDA=1"]},
                         py_limited_api=True)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
