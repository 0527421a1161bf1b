"""Loads the op library (_C*.so beside this file) into torch.ops.flowformer."""

from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent


def library_path() -> Path:
    """The path of the compiled op library: the same file a C++ program can link or load."""
    candidates = sorted(_HERE.glob("_C*.so")) + sorted(_HERE.glob("_C*.pyd"))
    if not candidates:
        raise ImportError(
            f"flowformer: the compiled op library (_C*.so) is missing from {_HERE}; build it with "
            "`pip install --no-build-isolation -e .` (or `make setup`)"
        )
    return candidates[0]


def load() -> None:
    torch.ops.load_library(str(library_path()))


def build_info() -> dict:
    """What the library was compiled with, e.g. {"cuda": True, "cuda_version": "13.0", "cuda_archs": [80, 90]}."""
    pairs = dict(item.split("=", 1) for item in torch.ops.flowformer._build_info().split(";"))
    info = {"cuda": pairs.pop("cuda") == "1"}
    if "cuda_version" in pairs:
        info["cuda_version"] = pairs["cuda_version"]
    if pairs.get("cuda_archs"):
        info["cuda_archs"] = [int(arch) // 10 for arch in pairs["cuda_archs"].split(",")]
    return info
