"""The chunked decomposition of causal Flow-Attention (tests/python/flow_chunked_model.py, the design of its fused
kernel in kernels/flow_attention/DESIGN.md) equals the spec's reference, in float64, whatever the chunk size: where
the reference overflows (clamp = inf: exp of a conserved source past 709), the CPU op, whose running maximum keeps
it finite as the model's does."""

import pytest
import torch

from flow_chunked_model import causal_flow_chunked
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
