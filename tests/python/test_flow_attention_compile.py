"""torch.compile(fullgraph=True) and torch.export of code that calls the op (Meta kernels in C++)."""

import pytest
import torch

from flowformer import functional as F
from helpers import devices, randn

OP = "flowformer::flow_attention"


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("causal", [False, True])
def test_compile_fullgraph_forward_backward(gen, causal, device):
    torch._dynamo.reset()

    def block(q, k, v, mask):
        out = F.flow_attention(torch.tanh(q), k * 2, v, causal=causal, feature_map="elu1",
                               key_padding_mask=mask)
        return (out * out).sum()

    B, H, L, D, M = 2, 2, 12, 4, 6
    q, k, v = (randn(gen, B, H, L, n, device=device) for n in (D, D, M))
    mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    mask[1, -3:] = True
    compiled = torch.compile(block, fullgraph=True)
    eager_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = block(*eager_leaves, mask)
    actual = compiled(*compiled_leaves, mask)
    expected.backward()
    actual.backward()
    torch.testing.assert_close(actual, expected)
    for a, b in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("device", devices(OP))
def test_compile_inductor_dynamic_shapes(gen, device):
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: F.flow_attention(q, k, v, causal=True) + 1, fullgraph=True, dynamic=True)
    for L in (8, 13):
        q, k, v = (randn(gen, 1, 2, L, 4, device=device) for _ in range(3))
        torch.testing.assert_close(fn(q, k, v), F.flow_attention(q, k, v, causal=True) + 1)


class Mixer(torch.nn.Module):
    def __init__(self, causal):
        super().__init__()
        self.proj = torch.nn.Linear(8, 3 * 8)
        self.causal = causal

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.proj(x).view(B, L, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.flow_attention(q, k, v, causal=self.causal).transpose(1, 2).reshape(B, L, 8)


@pytest.mark.parametrize("causal", [False, True])
def test_export(gen, causal):
    model = Mixer(causal)
    x = randn(gen, 2, 10, 8)
    batch = torch.export.Dim("batch", max=64)
    length = torch.export.Dim("length", max=4096)
    exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch, 1: length}})
    assert any("flowformer.flow_attention" in str(node.target) for node in exported.graph.nodes)
    y = randn(gen, 3, 17, 8)
    torch.testing.assert_close(exported.module()(y), model(y))
