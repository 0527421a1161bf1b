"""The algorithm of the CUDA backend (csrc/flow_attention/flow_attention_portable.h).

On a machine without a GPU it runs on host threads when FLOWFORMER_EMULATE_CUDA=1 (the same item
functions the CUDA kernels run, one per thread): `make test` runs the Flow-Attention tests a second
time in that mode. The CUDA cases below run on a GPU only.
"""

import pytest
import torch

from flowformer import functional as F
from flowformer import reference as R
from helpers import FORWARD_TOL, assert_close, devices, grad_tol, grads, randn

OP = "flowformer::flow_attention"
cuda_only = [p for p in devices(OP) if p != "cpu"]


def ops_called(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("causal", [False, True])
def test_emulation_switch_selects_the_cuda_algorithm(gen, causal, monkeypatch):
    # The CUDA algorithm takes its softmax through ATen (logcumsumexp when causal); the CPU kernels do not.
    marker = "aten::logcumsumexp" if causal else "aten::_softmax"
    q, k, v = (randn(gen, 1, 2, 70, 4) for _ in range(3))
    run = lambda: F.flow_attention(q, k, v, causal=causal)  # noqa: E731
    monkeypatch.setenv("FLOWFORMER_EMULATE_CUDA", "0")
    assert marker not in ops_called(run)
    monkeypatch.setenv("FLOWFORMER_EMULATE_CUDA", "1")
    assert marker in ops_called(run)


@pytest.mark.parametrize("causal", [False, True])
def test_long_padded_sequences_cpu_kernels_and_cuda_algorithm(gen, causal, monkeypatch):
    # Many chunks (64 rows each when causal, partial sums of 256 rows otherwise), padding that crosses
    # chunk borders; both CPU paths against the float64 reference.
    B, H, L, D, M = 2, 2, 700, 8, 5
    S = L if causal else 530
    q, k, v = randn(gen, B, H, L, D), randn(gen, B, H, S, D), randn(gen, B, H, S, M)
    qmask = torch.zeros(B, L, dtype=torch.bool)
    qmask[0, 60:200] = True
    kmask = torch.rand(B, S, generator=gen) < 0.3
    options = dict(causal=causal, query_padding_mask=qmask, key_padding_mask=kmask)
    grad_out = randn(gen, B, H, L, M)
    ref_out, ref_g = grads(lambda *x: R.flow_attention(*x, **options), [t.double() for t in (q, k, v)],
                           grad_out.double())
    for emulate in ("0", "1"):
        monkeypatch.setenv("FLOWFORMER_EMULATE_CUDA", emulate)
        out, g = grads(lambda *x: F.flow_attention(*x, **options), (q, k, v), grad_out)
        assert_close(out, ref_out, FORWARD_TOL[torch.float32], f"output (emulate={emulate})")
        for name, a, b in zip("qkv", g, ref_g):
            assert_close(a, b, grad_tol(torch.float32), f"grad {name} (emulate={emulate})")


@pytest.mark.parametrize("device", cuda_only)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256, 48, 320])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_head_dims(gen, causal, dtype, head_dim, device):
    B, H, L = 1, 2, 200
    q, k, v = (randn(gen, B, H, L, head_dim, dtype=dtype, device=device) for _ in range(3))
    grad_out = randn(gen, B, H, L, head_dim, dtype=dtype, device=device)
    out, g = grads(lambda *x: F.flow_attention(*x, causal=causal), (q, k, v), grad_out)
    ref_out, ref_g = grads(lambda *x: R.flow_attention(*x, causal=causal),
                           [t.double().cpu() for t in (q, k, v)], grad_out.double().cpu())
    assert_close(out, ref_out, FORWARD_TOL[dtype], "output")
    for name, a, b in zip("qkv", g, ref_g):
        assert_close(a, b, grad_tol(dtype), f"grad {name}")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_second_device(gen, causal):
    q, k, v = (randn(gen, 2, 2, 90, 8, device="cuda:1") for _ in range(3))
    out, g = grads(lambda *x: F.flow_attention(*x, causal=causal), (q, k, v), torch.ones(2, 2, 90, 8, device="cuda:1"))
    assert out.device == torch.device("cuda:1") and all(t.device == out.device for t in g)
    expected = F.flow_attention(q.cpu(), k.cpu(), v.cpu(), causal=causal)
    assert_close(out, expected, FORWARD_TOL[torch.float32], "output")
