"""flowformer: linear-complexity attention as PyTorch custom ops (torch.ops.flowformer.*).

    import flowformer
    out = flowformer.functional.flow_attention(q, k, v, causal=True)
"""

from . import _library

_library.load()

from . import functional  # noqa: E402
from ._library import build_info, library_path  # noqa: E402


def cuda_kernels_compiled() -> bool:
    """True when this build holds the CUDA kernels (built whenever nvcc was found at build time)."""
    return build_info()["cuda"]


__all__ = ["functional", "build_info", "cuda_kernels_compiled", "library_path"]
__version__ = "0.1.0"
