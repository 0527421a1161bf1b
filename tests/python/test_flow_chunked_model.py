"""The decompositions of Flow-Attention that its fused kernels are designed on (tests/python/flow_chunked_model.py,
kernels/flow_attention/DESIGN.md) equal the spec's reference in float64: causal in chunks of any size (its gradients
in three passes over the chunks and value tiles, against autograd through the reference, and through the op from an
incoming state with the final state's gradient), non-causal in four passes over segments of any size (its gradients
in four more). Where the reference overflows (clamp = inf: exp of a conserved source past 709), the CPU op, whose
running maximum keeps it finite as the model's does."""

import pytest
import torch

from flow_chunked_model import (causal_flow_chunked, causal_flow_chunked_backward, noncausal_flow_backward_passes,
                                noncausal_flow_passes)
from flowformer import functional as F
from flowformer import reference as R


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
@pytest.mark.parametrize("feature_map", ["sigmoid", "elu1", "relu", "identity"])
@pytest.mark.parametrize("clamp", [1.0, 0.05, float("inf")])
@pytest.mark.parametrize("padding", ["none", "left", "right", "random"])
def test_chunked_model_equals_reference(chunk, feature_map, clamp, padding):
    gen = torch.Generator().manual_seed(hash((chunk, feature_map, clamp, padding)) % 2**31)
    B, H, L, D, M = 2, 2, 150, 5, 3
    query, key = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) * 2 for _ in range(2))
    value = torch.randn(B, H, L, M, generator=gen, dtype=torch.float64)
    if feature_map == "identity":
        query, key = query.abs(), key.abs()
    pad = torch.zeros(B, L, dtype=torch.bool)
    if padding == "left":
        pad[0, :70] = True  # a whole chunk of 64 padded, and more
    elif padding == "right":
        pad[1, 90:] = True
    elif padding == "random":
        pad = torch.rand(B, L, generator=gen) < 0.3
    options = dict(causal=True, feature_map=feature_map, eps=1e-6, clamp=clamp)
    expected = R.flow_attention(query, key, value, query_padding_mask=pad, **options)
    op = F.flow_attention(query, key, value, query_padding_mask=pad, **options)
    q, k = R.apply_feature_map(query, feature_map), R.apply_feature_map(key, feature_map)
    got = causal_flow_chunked(q, k, value, ~pad, eps=1e-6, clamp=clamp, chunk=chunk)
    assert torch.isfinite(got).all()
    finite = torch.isfinite(expected)
    assert finite.all() or clamp == float("inf")
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, op, rtol=1e-9, atol=1e-12)


def test_the_comparison_sees_a_small_change():
    """The model is not the reference by construction: eps moved by 0.1% (where its terms matter) fails the check."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.rand(1, 1, 40, 3, generator=gen, dtype=torch.float64) * 1e-3 for _ in range(2))
    v = torch.randn(1, 1, 40, 2, generator=gen, dtype=torch.float64)
    valid = torch.ones(1, 40, dtype=torch.bool)
    eps = 1e-2
    expected = R.flow_attention(q, k, v, causal=True, feature_map="identity", eps=eps)
    got = causal_flow_chunked(q, k, v, valid, eps=eps, clamp=1.0, chunk=16)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    moved = causal_flow_chunked(q, k, v, valid, eps=eps * (1 + 1e-3), clamp=1.0, chunk=16)
    assert not torch.allclose(moved, expected, rtol=1e-8, atol=0)


@pytest.mark.parametrize("segment", [1, 5, 64, 1000])
@pytest.mark.parametrize("feature_map", ["sigmoid", "elu1", "relu", "identity"])
@pytest.mark.parametrize("clamp", [1.0, 0.05, float("inf")])
@pytest.mark.parametrize("padding", ["none", "both", "all_keys"])
def test_noncausal_passes_equal_reference(segment, feature_map, clamp, padding):
    gen = torch.Generator().manual_seed(hash((segment, feature_map, clamp, padding)) % 2**31)
    B, H, L, S, D, M = 2, 2, 70, 45, 5, 3
    query = torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) * 2
    key = torch.randn(B, H, S, D, generator=gen, dtype=torch.float64) * 2
    value = torch.randn(B, H, S, M, generator=gen, dtype=torch.float64)
    if feature_map == "identity":
        query, key = query.abs(), key.abs()
    qpad, kpad = torch.zeros(B, L, dtype=torch.bool), torch.zeros(B, S, dtype=torch.bool)
    if padding == "both":
        qpad = torch.rand(B, L, generator=gen) < 0.3
        kpad = torch.rand(B, S, generator=gen) < 0.3
    elif padding == "all_keys":
        kpad[1] = True  # an element with no valid key: its output is 0
    options = dict(causal=False, feature_map=feature_map, eps=1e-6, clamp=clamp, query_padding_mask=qpad,
                   key_padding_mask=kpad)
    expected = R.flow_attention(query, key, value, **options)
    op = F.flow_attention(query, key, value, **options)
    q, k = R.apply_feature_map(query, feature_map), R.apply_feature_map(key, feature_map)
    got = noncausal_flow_passes(q, k, value, ~qpad, ~kpad, eps=1e-6, clamp=clamp, segment=segment)
    assert torch.isfinite(got).all()
    finite = torch.isfinite(expected)
    assert finite.all() or clamp == float("inf")
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, op, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("clamp", [1.0, 0.05, float("inf")])
@pytest.mark.parametrize("padding", ["none", "left", "random"])
def test_causal_backward_passes_equal_autograd(chunk, clamp, padding):
    gen = torch.Generator().manual_seed(hash((chunk, clamp, padding)) % 2**31)
    B, H, L, D, M = 2, 2, 90, 4, 3
    q = torch.rand(B, H, L, D, generator=gen, dtype=torch.float64)  # features: non-negative
    k = torch.rand(B, H, L, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, L, M, generator=gen, dtype=torch.float64)
    dout = torch.randn(B, H, L, M, generator=gen, dtype=torch.float64)
    pad = torch.zeros(B, L, dtype=torch.bool)
    if padding == "left":
        pad[0, :70] = True
    elif padding == "random":
        pad = torch.rand(B, L, generator=gen) < 0.3
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = R.flow_attention(*inputs, causal=True, feature_map="identity", eps=1e-6, clamp=clamp,
                           query_padding_mask=pad)
    expected = torch.autograd.grad(out, inputs, dout)
    got = causal_flow_chunked_backward(q, k, v, ~pad, dout, eps=1e-6, clamp=clamp, chunk=chunk)
    assert got[3] is None
    for name, a, b in zip("qkv", got, expected):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("chunk,tile,segment", [(1, None, None), (7, 2, None), (64, None, None), (7, 2, 21),
                                                 (8, None, 16)])
@pytest.mark.parametrize("clamp", [1.0, float("inf")])
@pytest.mark.parametrize("padding", ["none", "random", "left", "all"])
@pytest.mark.parametrize("grads", ["out", "state", "both"])
def test_causal_backward_passes_from_a_state_equal_the_op(chunk, tile, segment, clamp, padding, grads):
    """The three passes (value tiles' shares added between them; segment: the chain's split schedule, its levels
    of sums scanned over the segments) from an incoming state, with the final state's gradient, equal the op's
    gradients to q, k, v and the incoming state (CPU, float64)."""
    gen = torch.Generator().manual_seed(hash((chunk, tile, segment, clamp, padding, grads)) % 2**31)
    B, H, L, D, M = 2, 2, 80, 4, 5
    prefix = [torch.rand(B, H, 30, D, generator=gen, dtype=torch.float64) for _ in range(2)]
    options = dict(feature_map="identity", eps=1e-6, clamp=clamp)
    _, state = F.causal_flow_attention(*prefix, torch.randn(B, H, 30, M, generator=gen, dtype=torch.float64),
                                       **options)
    q = torch.rand(B, H, L, D, generator=gen, dtype=torch.float64)
    k = torch.rand(B, H, L, D, generator=gen, dtype=torch.float64) * 3  # sources past clamp 1
    v = torch.randn(B, H, L, M, generator=gen, dtype=torch.float64)
    pad = torch.zeros(B, L, dtype=torch.bool)
    if padding == "left":
        pad[0, :70] = True
    elif padding == "random":
        pad = torch.rand(B, L, generator=gen) < 0.3
    elif padding == "all":
        pad[1] = True  # the state passes through: its gradient is the final state's
    dout = torch.randn(B, H, L, M, generator=gen, dtype=torch.float64) * (grads != "state")
    dstate = torch.randn(state.shape, generator=gen, dtype=torch.float64) * (grads != "out")
    inputs = [x.clone().requires_grad_() for x in (q, k, v, state)]
    out, final = F.causal_flow_attention(*inputs[:3], state=inputs[3], query_padding_mask=pad, **options)
    expected = torch.autograd.grad((out, final), inputs, (dout, dstate))
    got = causal_flow_chunked_backward(q, k, v, ~pad, dout, eps=1e-6, clamp=clamp, chunk=chunk, tile=tile,
                                       state=state, grad_state=dstate, segment=segment)
    for name, a, b in zip(("dq", "dk", "dv", "dstate"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("segment", [1, 7, 1000])
@pytest.mark.parametrize("clamp", [1.0, 0.05, float("inf")])
@pytest.mark.parametrize("padding", ["none", "both", "all_keys"])
def test_noncausal_backward_passes_equal_autograd(segment, clamp, padding):
    gen = torch.Generator().manual_seed(hash((segment, clamp, padding)) % 2**31)
    B, H, L, S, D, M = 2, 2, 40, 30, 4, 3
    q = torch.rand(B, H, L, D, generator=gen, dtype=torch.float64)  # features: non-negative
    k = torch.rand(B, H, S, D, generator=gen, dtype=torch.float64) * 3  # sources past clamp 1
    v = torch.randn(B, H, S, M, generator=gen, dtype=torch.float64)
    dout = torch.randn(B, H, L, M, generator=gen, dtype=torch.float64)
    qpad, kpad = torch.zeros(B, L, dtype=torch.bool), torch.zeros(B, S, dtype=torch.bool)
    if padding == "both":
        qpad = torch.rand(B, L, generator=gen) < 0.3
        kpad = torch.rand(B, S, generator=gen) < 0.3
    elif padding == "all_keys":
        kpad[1] = True  # an element with no valid key: its output is 0, and so are its gradients
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = R.flow_attention(*inputs, causal=False, feature_map="identity", eps=1e-6, clamp=clamp,
                           query_padding_mask=qpad, key_padding_mask=kpad)
    expected = torch.autograd.grad(out, inputs, dout)
    got = noncausal_flow_backward_passes(q, k, v, ~qpad, ~kpad, dout, eps=1e-6, clamp=clamp, segment=segment)
    for name, a, b in zip("qkv", got, expected):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda m: f"d{name}: {m}")
