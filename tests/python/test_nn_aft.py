"""AFT layers: shapes, output = projections + the functional op, gradients to every parameter, causality."""

import pytest
import torch

import flowformer.nn as fnn
from flowformer import functional as F
from helpers import randn


def layers():
    torch.manual_seed(0)
    return {
        "full": fnn.AFTFull(16, max_seq_len=32, rank=4),
        "full_dense": fnn.AFTFull(16, max_seq_len=32, rank=None, causal=True),
        "local": fnn.AFTLocal(16, max_seq_len=32, window=3, causal=True),
        "simple": fnn.AFTSimple(16, causal=True),
    }


@pytest.mark.parametrize("name", ["full", "full_dense", "local", "simple"])
def test_sequence_layers(gen, name):
    layer = layers()[name]
    x = randn(gen, 2, 20, 16).requires_grad_()
    out = layer(x)
    assert out.shape == x.shape
    q, k, v = layer.to_q(x), layer.to_k(x), layer.to_v(x)
    if name == "simple":
        expected = F.aft_simple(q, k, v, causal=True)
    else:
        expected = F.aft_full(q, k, v, layer.position_bias(20), causal=layer.causal, window=layer._window())
    torch.testing.assert_close(out, layer.out_proj(expected))
    out.square().sum().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    if getattr(layer, "causal", False):  # the output at t does not depend on inputs after t
        y = x.detach().clone()
        y[:, 10:] += 1.0
        torch.testing.assert_close(layer(y)[:, :10], layer(x.detach())[:, :10])


def test_too_long_sequence_is_refused(gen):
    with pytest.raises(RuntimeError, match="exceeds max_seq_len 32"):
        layers()["full"](randn(gen, 1, 33, 16))


def test_aft_conv_layer(gen):
    layer = fnn.AFTConv(16, heads=4, kernel_size=3)
    x = randn(gen, 2, 5, 6, 16).requires_grad_()
    out = layer(x)
    assert out.shape == x.shape
    q, k, v = layer.to_q(x), layer.to_k(x), layer.to_v(x)
    torch.testing.assert_close(out, layer.out_proj(F.aft_conv(q, k, v, layer.weight())))
    out.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    with pytest.raises(ValueError, match="kernel_size"):
        fnn.AFTConv(16, heads=4, kernel_size=2)
