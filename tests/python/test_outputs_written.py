"""Outputs are poisoned with NaN before the kernels run (FLOWFORMER_POISON_OUTPUTS=1): every element
of every output and gradient must be written, padded positions included."""

import shutil

import pytest
import torch

import flowformer
from flowformer import functional as F
from helpers import devices, randn

OP = "flowformer::flow_attention"


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_every_element_written(gen, causal, dtype, device, monkeypatch):
    monkeypatch.setenv("FLOWFORMER_POISON_OUTPUTS", "1")
    B, H, L, D, M = 3, 2, 10, 4, 5
    q, k, v = (randn(gen, B, H, L, n, dtype=dtype, device=device).requires_grad_() for n in (D, D, M))
    mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    mask[0, :3] = True
    mask[2] = True
    out = F.flow_attention(q, k, v, causal=causal, query_padding_mask=mask, key_padding_mask=mask)
    out.backward(torch.ones_like(out))
    for t in (out, q.grad, k.grad, v.grad):
        assert not torch.isnan(t).any()


def test_build_info():
    info = flowformer.build_info()
    assert set(info) <= {"cuda", "cuda_version", "cuda_archs"}
    assert flowformer.cuda_kernels_compiled() == info["cuda"]
    if info["cuda"]:
        assert info["cuda_archs"], "CUDA build without a recorded architecture"
    assert flowformer.library_path().exists()


@pytest.mark.skipif(shutil.which("nvcc") is None or torch.version.cuda is None,
                    reason="needs nvcc on PATH and a CUDA build of torch")
def test_cuda_part_built_where_nvcc_exists():
    # setup.py builds the CUDA kernels whenever nvcc is found (and torch has CUDA): never silently without.
    assert flowformer.cuda_kernels_compiled()
