"""gradcheck in float64 and torch.library.opcheck (schema, fake tensors, autograd registration, AOT)."""

import pytest
import torch

from flowformer import functional as F
from helpers import devices, randn

OP = "flowformer::flow_attention"


def inputs(gen, B, H, L, S, D, M, device, requires_grad=True):
    return [randn(gen, *shape, dtype=torch.float64, device=device).requires_grad_(requires_grad)
            for shape in ((B, H, L, D), (B, H, S, D), (B, H, S, M))]


def away_from_relu_kink(x):
    x = x.detach()
    x = x.sign() * (x.abs() + 0.1)
    x[..., 0] = x[..., 0].abs()
    return x.requires_grad_()


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("feature_map", ["sigmoid", "elu1", "relu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(gen, masked, causal, feature_map, device):
    B, H, L, D, M = 2, 2, 6, 3, 4
    S = L if causal else 5
    q, k, v = inputs(gen, B, H, L, S, D, M, device)
    if feature_map == "relu":
        # Finite differences need inputs away from relu's kink, and rows with a positive feature: with
        # all features 0, <q + eps, K + eps> = O(eps) and the output is ill-conditioned.
        q, k = (away_from_relu_kink(t) for t in (q, k))
    qmask = kmask = None
    if masked:
        qmask = torch.tensor([[False] * L, [True] + [False] * (L - 2) + [True]], device=device)
        kmask = torch.tensor([[False] * (S - 1) + [True], [True, True] + [False] * (S - 2)], device=device)

    def fn(q_, k_, v_):
        return F.flow_attention(q_, k_, v_, causal=causal, feature_map=feature_map, clamp=5.0,
                                query_padding_mask=qmask, key_padding_mask=kmask)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def opcheck_cases(gen, device):
    cases = []
    for requires_grad in (False, True):
        q, k, v = inputs(gen, 2, 3, 7, 5, 4, 6, device, requires_grad)
        cases.append(((q, k, v), {}))
        q, k, v = inputs(gen, 1, 2, 9, 9, 3, 2, device, requires_grad)
        cases.append(((q, k, v), {"causal": True, "feature_map": "elu1", "clamp": float("inf")}))
    q, k, v = (t.float() for t in inputs(gen, 2, 2, 8, 6, 4, 4, device, False))
    masks = {"query_padding_mask": torch.tensor([[False] * 7 + [True], [True] + [False] * 7], device=device),
             "key_padding_mask": torch.tensor([[False] * 5 + [True], [False] * 6], device=device)}
    cases.append(((q.requires_grad_(), k.requires_grad_(), v), {"eps": 1e-3, **masks}))
    cases.append(((q.detach().transpose(2, 3).contiguous().transpose(2, 3), k.detach(), v),
                  {"causal": False, "feature_map": "relu"}))
    return cases


@pytest.mark.parametrize("device", devices(OP))
def test_opcheck(gen, device):
    for args, kwargs in opcheck_cases(gen, device):
        torch.library.opcheck(torch.ops.flowformer.flow_attention.default, args, kwargs)


@pytest.mark.parametrize("device", devices(OP))
def test_opcheck_backward_op(gen, device):
    q, k, v = inputs(gen, 2, 2, 5, 5, 3, 4, device, False)
    grad_out = randn(gen, 2, 2, 5, 4, dtype=torch.float64, device=device)
    for causal in (False, True):
        torch.library.opcheck(
            torch.ops.flowformer.flow_attention_backward.default, (grad_out, q, k, v),
            {"causal": causal, "feature_map": "sigmoid", "eps": 1e-6, "clamp": 1.0,
             "query_padding_mask": None, "key_padding_mask": None})


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("causal", [False, True])
def test_backward_is_deterministic(gen, causal, device):
    q, k, v = (t.float() for t in inputs(gen, 2, 4, 64, 64, 16, 16, device, False))
    grad_out = randn(gen, 2, 4, 64, 16, device=device)
    first = torch.ops.flowformer.flow_attention_backward(grad_out, q, k, v, causal=causal, feature_map="sigmoid",
                                                         eps=1e-6, clamp=1.0, query_padding_mask=None,
                                                         key_padding_mask=None)
    for _ in range(3):
        again = torch.ops.flowformer.flow_attention_backward(grad_out, q, k, v, causal=causal,
                                                             feature_map="sigmoid", eps=1e-6, clamp=1.0,
                                                             query_padding_mask=None, key_padding_mask=None)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_double_backward_raises_clearly(gen, causal):
    q, k, v = inputs(gen, 1, 2, 5, 5, 3, 4, "cpu")
    out = F.flow_attention(q, k, v, causal=causal)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    assert gq.requires_grad
    with pytest.raises(RuntimeError, match="flow_attention_backward: double backward .* is not supported"):
        gq.sum().backward()
