"""Packed sequences in causal_linear_attention (spec/linear_attention.md, "Packed sequences"): with
cu_seqlens, the N sequences back to back along L (B == 1) are independent runs, each from its own state,
and equal running each sequence alone: outputs, final states and gradients (initial states included),
empty sequences too. float64 gradcheck, torch.library.opcheck and torch.compile with cu_seqlens."""

import itertools

import pytest
import torch

from flowformer import functional as F
from flowformer import reference as R
from helpers import DTYPES, FORWARD_TOL, assert_close, devices, features_input, grad_tol, randn

OP = "flowformer::causal_linear_attention"
FEATURE_MAPS = ["elu1", "relu", "sigmoid", "identity"]
# Uneven lengths: 1, empty sequences in the middle and at the end, sequences across 64-row chunks.
LENGTHS = [(1, 0, 70, 130, 5), (3, 0, 64, 1, 0)]
NAMES = ("query", "key", "value", "initial_kv", "initial_z")


def cu_seqlens(lengths, dtype=torch.int64, device="cpu"):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=dtype, device=device)


def state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def problem(gen, lengths, H, D, M, dtype, device, feature_map="elu1"):
    """(query, key, value, initial_kv, initial_z) of packed sequences, and gradients for (out, kv, z)."""
    L, N, sdtype = sum(lengths), len(lengths), state_dtype(dtype)
    q = features_input(gen, (1, H, L, D), feature_map, dtype, device)
    k = features_input(gen, (1, H, L, D), feature_map, dtype, device)
    v = randn(gen, 1, H, L, M, dtype=dtype, device=device)
    kv0 = randn(gen, N, H, D, M, dtype=sdtype, device=device)
    z0 = (torch.rand(N, H, D, generator=gen, dtype=torch.float64) + 1).to(sdtype).to(device)
    grad_outputs = (randn(gen, 1, H, L, M, dtype=dtype, device=device), randn(gen, N, H, D, M, dtype=sdtype,
                    device=device), randn(gen, N, H, D, dtype=sdtype, device=device))
    return (q, k, v, kv0, z0), grad_outputs


def packed_run(inputs, grad_outputs, cu, **options):
    """(out, final_kv, final_z) of one packed call, and the gradients of <results, grad_outputs>."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    q, k, v, kv0, z0 = leaves
    results = F.causal_linear_attention(q, k, v, initial_kv=kv0, initial_z=z0, cu_seqlens=cu, **options)
    return [r.detach() for r in results], torch.autograd.grad(results, leaves, grad_outputs)


def separate_run(inputs, grad_outputs, lengths, **options):
    """The same from one call per sequence, each alone (B = 1, L = its length, its own state)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    q, k, v, kv0, z0 = leaves
    outs, kvs, zs = [], [], []
    for n, (start, end) in enumerate(itertools.pairwise(cu_seqlens(lengths).tolist())):
        out, kv, z = F.causal_linear_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                               initial_kv=kv0[n:n + 1], initial_z=z0[n:n + 1], **options)
        outs.append(out)
        kvs.append(kv)
        zs.append(z)
    results = (torch.cat(outs, 2), torch.cat(kvs), torch.cat(zs))
    return [r.detach() for r in results], torch.autograd.grad(results, leaves, grad_outputs)


def assert_runs_close(packed, separate, dtype):
    (outs, grads), (expected_outs, expected_grads) = packed, separate
    forward, backward = (1e-12, 1e-12) if dtype == torch.float64 else (FORWARD_TOL[dtype], grad_tol(dtype))
    for name, a, b in zip(("out", "final_kv", "final_z"), outs, expected_outs):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, forward, name)
    for name, a, b in zip(NAMES, grads, expected_grads):
        assert a.shape == b.shape, name
        assert_close(a, b, backward, f"grad {name}")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("D,M", [(4, 3), (16, 32)])  # (16, 32): the fused CUDA kernels' head dims
def test_packed_linear_attention_equals_separate_runs(gen, D, M, lengths, normalize, feature_map, dtype, device):
    inputs, grad_outputs = problem(gen, lengths, 2, D, M, dtype, device, feature_map)
    options = dict(feature_map=feature_map, normalize=normalize)
    packed = packed_run(inputs, grad_outputs, cu_seqlens(lengths, device=device), **options)
    assert_runs_close(packed, separate_run(inputs, grad_outputs, lengths, **options), dtype)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("on_cpu", [False, True])
def test_packed_linear_attention_index_dtypes_and_devices(gen, on_cpu, index_dtype, device):
    # cu_seqlens int32 or int64, on the device of query or on the CPU.
    lengths = (5, 0, 66, 2)
    inputs, grad_outputs = problem(gen, lengths, 3, 5, 4, torch.float64, device)
    cu = cu_seqlens(lengths, index_dtype, "cpu" if on_cpu else device)
    assert_runs_close(packed_run(inputs, grad_outputs, cu), separate_run(inputs, grad_outputs, lengths),
                      torch.float64)


@pytest.mark.parametrize("device", devices(OP))
def test_packed_linear_attention_matches_reference(gen, device):
    # Against the float64 reference of spec/linear_attention.md, run on each sequence alone.
    lengths = (1, 0, 70, 130, 5)
    (q, k, v, kv0, z0), _ = problem(gen, lengths, 2, 4, 3, torch.float64, device)
    out, kv, z = F.causal_linear_attention(q, k, v, initial_kv=kv0, initial_z=z0,
                                           cu_seqlens=cu_seqlens(lengths, device=device))
    for n, (start, end) in enumerate(itertools.pairwise(cu_seqlens(lengths).tolist())):
        ref = R.causal_linear_attention(*(t[:, :, start:end].cpu() for t in (q, k, v)), initial_kv=kv0[n:n + 1].cpu(),
                                        initial_z=z0[n:n + 1].cpu())
        assert_close(out[:, :, start:end], ref[0], 1e-12, f"out of sequence {n}")
        assert_close(kv[n:n + 1], ref[1], 1e-12, f"final_kv of sequence {n}")
        assert_close(z[n:n + 1], ref[2], 1e-12, f"final_z of sequence {n}")


@pytest.mark.parametrize("device", devices(OP))
def test_packed_linear_attention_many_short_sequences(gen, device):
    lengths = torch.randint(0, 5, (200,), generator=gen).tolist()
    inputs, grad_outputs = problem(gen, lengths, 2, 3, 2, torch.float64, device)
    cu = cu_seqlens(lengths, torch.int32, device)
    assert_runs_close(packed_run(inputs, grad_outputs, cu), separate_run(inputs, grad_outputs, lengths),
                      torch.float64)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("with_state", [False, True])
def test_packed_linear_attention_empty_sequences_pass_the_state_through(gen, with_state, device):
    lengths = (0, 4, 0, 3, 0)
    (q, k, v, kv0, z0), (g, gkv, gz) = problem(gen, lengths, 2, 3, 4, torch.float64, device)
    kv0, z0 = (t.requires_grad_() for t in (kv0, z0))
    initial = dict(initial_kv=kv0, initial_z=z0) if with_state else {}
    out, kv, z = F.causal_linear_attention(q, k, v, cu_seqlens=cu_seqlens(lengths, device=device), **initial)
    assert kv.shape == (5, 2, 3, 4) and z.shape == (5, 2, 3)
    for n in (0, 2, 4):
        assert torch.equal(kv[n], kv0[n] if with_state else torch.zeros_like(kv0[n])), f"final_kv of sequence {n}"
        assert torch.equal(z[n], z0[n] if with_state else torch.zeros_like(z0[n])), f"final_z of sequence {n}"
    for n in (1, 3):
        assert not torch.equal(kv[n], kv0[n]) and not torch.equal(z[n], z0[n])
    if with_state:
        grads = torch.autograd.grad((out, kv, z), (kv0, z0), (g, gkv, gz))
        for n in (0, 2, 4):
            assert torch.equal(grads[0][n], gkv[n]) and torch.equal(grads[1][n], gz[n]), f"sequence {n}"


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("lengths", [(), (0,), (0, 0, 0)])
def test_packed_linear_attention_without_positions(gen, lengths, device):
    # L == 0: N = 0 sequences (cu_seqlens = [0]), or only empty ones.
    (q, k, v, kv0, z0), (g, gkv, gz) = problem(gen, lengths, 2, 3, 4, torch.float64, device)
    q, kv0, z0 = (t.requires_grad_() for t in (q, kv0, z0))
    out, kv, z = F.causal_linear_attention(q, k, v, initial_kv=kv0, initial_z=z0,
                                           cu_seqlens=cu_seqlens(lengths, device=device))
    N = len(lengths)
    assert out.shape == (1, 2, 0, 4) and kv.shape == (N, 2, 3, 4) and z.shape == (N, 2, 3)
    assert torch.equal(kv, kv0) and torch.equal(z, z0)
    dq, dkv, dz = torch.autograd.grad((out, kv, z), (q, kv0, z0), (g, gkv, gz))
    assert dq.shape == q.shape and torch.equal(dkv, gkv) and torch.equal(dz, gz)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("normalize", [True, False])
def test_packed_linear_attention_gradcheck(gen, normalize, device):
    lengths = (2, 0, 3, 1)
    inputs, _ = problem(gen, lengths, 2, 3, 2, torch.float64, device)
    cu = cu_seqlens(lengths, torch.int32, device)

    def fn(q, k, v, kv0, z0):
        return F.causal_linear_attention(q, k, v, normalize=normalize, initial_kv=kv0, initial_z=z0, cu_seqlens=cu)

    leaves = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", devices(OP))
def test_packed_linear_attention_opcheck(gen, device):
    lengths = (3, 0, 6, 1)
    op = torch.ops.flowformer.causal_linear_attention.default
    for requires_grad in (False, True):
        inputs, _ = problem(gen, lengths, 2, 4, 3, torch.float64, device)
        q, k, v, kv0, z0 = (t.requires_grad_(requires_grad) for t in inputs)
        torch.library.opcheck(op, (q, k, v), {"cu_seqlens": cu_seqlens(lengths, torch.int32, device)})
        torch.library.opcheck(op, (q, k, v), {"initial_kv": kv0, "initial_z": z0, "normalize": False,
                                              "cu_seqlens": cu_seqlens(lengths, device=device)})
    (q, k, v, kv0, z0), (g, gkv, gz) = problem(gen, lengths, 2, 4, 3, torch.float64, device)
    torch.library.opcheck(torch.ops.flowformer.causal_linear_attention_backward.default, (g, gkv, gz, q, k, v),
                          {"feature_map": "elu1", "normalize": True, "eps": 1e-6, "initial_kv": kv0,
                           "initial_z": z0, "cu_seqlens": cu_seqlens(lengths, device=device)})


@pytest.mark.parametrize("device", devices(OP))
def test_packed_linear_attention_compile_fullgraph_forward_backward(gen, device):
    lengths = (5, 0, 70, 1)
    inputs, _ = problem(gen, lengths, 2, 4, 3, torch.float32, device)
    leaves = [t.requires_grad_() for t in inputs]
    cu = cu_seqlens(lengths, torch.int32, device)

    def model(q, k, v, kv0, z0, cu_):
        out, kv, z = F.causal_linear_attention(q.tanh(), k, v, initial_kv=kv0, initial_z=z0, cu_seqlens=cu_)
        return out.square().sum() + kv.sum() + z.sum()

    compiled = torch.compile(model, fullgraph=True)
    expected = torch.autograd.grad(model(*leaves, cu), leaves)
    actual = torch.autograd.grad(compiled(*leaves, cu), leaves)
    for name, a, b in zip(NAMES, actual, expected):
        torch.testing.assert_close(a, b, msg=name)
