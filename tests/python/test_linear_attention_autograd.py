"""Linear attention: float64 gradcheck (initial states included), torch.library.opcheck on every op,
torch.compile (fullgraph, forward and backward), torch.export, determinism, clear errors."""

import pytest
import torch

from flowformer import functional as F
from helpers import devices, randn

CAUSAL = "flowformer::causal_linear_attention"


def qkv(gen, B, H, L, S, D, M, device, dtype=torch.float64, requires_grad=True):
    return [randn(gen, *shape, dtype=dtype, device=device).requires_grad_(requires_grad)
            for shape in ((B, H, L, D), (B, H, S, D), (B, H, S, M))]


@pytest.mark.parametrize("device", devices(CAUSAL))
@pytest.mark.parametrize("feature_map", ["elu1", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_causal(gen, normalize, feature_map, device):
    B, H, L, D, M = 2, 2, 7, 3, 4
    q, k, v = qkv(gen, B, H, L, L, D, M, device)
    kv0 = randn(gen, B, H, D, M, dtype=torch.float64, device=device).requires_grad_()
    z0 = torch.rand(B, H, D, generator=gen, dtype=torch.float64).add(1).to(device).requires_grad_()

    def fn(*x):
        return F.causal_linear_attention(*x[:3], feature_map=feature_map, normalize=normalize, initial_kv=x[3],
                                         initial_z=x[4])

    assert torch.autograd.gradcheck(fn, (q, k, v, kv0, z0), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", devices(CAUSAL))
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_noncausal(gen, masked, device):
    q, k, v = qkv(gen, 2, 2, 6, 5, 3, 4, device)
    mask = torch.tensor([[False] * 4 + [True], [True] + [False] * 4], device=device) if masked else None
    assert torch.autograd.gradcheck(lambda *x: F.linear_attention(*x, key_padding_mask=mask), (q, k, v),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def opcheck_cases(gen, device):
    cases = []
    for requires_grad in (False, True):
        q, k, v = qkv(gen, 2, 3, 9, 9, 4, 5, device, requires_grad=requires_grad)
        kv0 = randn(gen, 2, 3, 4, 5, dtype=torch.float64, device=device).requires_grad_(requires_grad)
        z0 = torch.rand(2, 3, 4, generator=gen, dtype=torch.float64).add(1).to(device)
        cases.append((torch.ops.flowformer.causal_linear_attention.default, (q, k, v), {}))
        cases.append((torch.ops.flowformer.causal_linear_attention.default, (q, k, v),
                      {"initial_kv": kv0, "initial_z": z0, "normalize": False, "feature_map": "relu"}))
        q1, k1, v1 = (t[:, :, :1] for t in (q, k, v))  # a decoding step
        cases.append((torch.ops.flowformer.causal_linear_attention.default, (q1, k1, v1),
                      {"initial_kv": kv0, "initial_z": z0}))
        q, k, v = qkv(gen, 2, 3, 7, 5, 4, 6, device, requires_grad=requires_grad)
        mask = torch.tensor([[False] * 4 + [True], [False] * 5], device=device)
        cases.append((torch.ops.flowformer.linear_attention.default, (q, k, v), {"key_padding_mask": mask}))
    g = randn(gen, 2, 3, 9, 5, dtype=torch.float64, device=device)
    q, k, v = qkv(gen, 2, 3, 9, 9, 4, 5, device, requires_grad=False)
    cases.append((torch.ops.flowformer.causal_linear_attention_backward.default, (g, None, None, q, k, v),
                  {"feature_map": "elu1", "normalize": True, "eps": 1e-6, "initial_kv": None, "initial_z": None,
                   "cu_seqlens": None}))
    q, k, v = qkv(gen, 2, 3, 9, 4, 4, 5, device, requires_grad=False)
    cases.append((torch.ops.flowformer.linear_attention_backward.default, (g, q, k, v),
                  {"feature_map": "elu1", "eps": 1e-6, "key_padding_mask": None}))
    return cases


@pytest.mark.parametrize("device", devices(CAUSAL))
def test_opcheck(gen, device):
    for op, args, kwargs in opcheck_cases(gen, device):
        torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("device", devices(CAUSAL))
@pytest.mark.parametrize("causal", [False, True])
def test_backward_is_deterministic(gen, causal, device):
    q, k, v = qkv(gen, 2, 2, 150, 150, 8, 8, device, dtype=torch.float32)
    fn = (lambda *x: F.causal_linear_attention(*x)[0]) if causal else F.linear_attention
    g = randn(gen, 2, 2, 150, 8, device=device)
    first = torch.autograd.grad(fn(q, k, v), (q, k, v), g)
    second = torch.autograd.grad(fn(q, k, v), (q, k, v), g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", devices(CAUSAL))
@pytest.mark.parametrize("causal", [False, True])
def test_compile_fullgraph_forward_backward(gen, causal, device):
    q, k, v = qkv(gen, 2, 2, 33, 33, 4, 5, device, dtype=torch.float32)

    def model(q_, k_, v_):
        if causal:
            out, kv, z = F.causal_linear_attention(q_.tanh(), k_, v_)
            return out.sum() + kv.sum() + z.sum()
        return F.linear_attention(q_.tanh(), k_, v_).sum()

    compiled = torch.compile(model, fullgraph=True)
    expected = torch.autograd.grad(model(q, k, v), (q, k, v))
    actual = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_export(gen, causal):
    class Mixer(torch.nn.Module):
        def forward(self, q, k, v):
            return F.causal_linear_attention(q, k, v)[0] if causal else F.linear_attention(q, k, v)

    q, k, v = qkv(gen, 1, 2, 12, 12, 4, 4, "cpu", dtype=torch.float32, requires_grad=False)
    exported = torch.export.export(Mixer(), (q, k, v))
    torch.testing.assert_close(exported.module()(q, k, v), Mixer()(q, k, v))


def test_double_backward_raises_clearly(gen):
    q, k, v = qkv(gen, 1, 1, 5, 5, 2, 2, "cpu")
    out = F.causal_linear_attention(q, k, v)[0]
    (dq,) = torch.autograd.grad(out.sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="causal_linear_attention_backward: double backward"):
        dq.sum().backward()
