"""flow_attention against the float64 reference of spec/flow_attention.md: outputs and gradients."""

import pytest
import torch

from flowformer import functional as F
from flowformer import reference as R
from helpers import (DTYPES, FORWARD_TOL, assert_close, conditioned_grad_tol, devices, grad_tol, grads, randn,
                     reference_roundoff)

OP = "flowformer::flow_attention"
FEATURE_MAPS = ["sigmoid", "elu1", "relu", "identity"]
# (B, H, L, S, D, M): L != S, L or S = 1, D != M, D = 1, odd sizes; the last one spans several chunks of
# the CUDA algorithm (64 rows per causal chunk, 256 per partial sum). Causal cases use S = L.
SHAPES = [(2, 3, 17, 13, 5, 6), (1, 2, 1, 9, 4, 4), (2, 1, 9, 1, 3, 5), (2, 2, 11, 7, 1, 3), (1, 3, 33, 33, 7, 2),
          (1, 2, 300, 270, 4, 3)]


def make_inputs(gen, shape, causal, dtype, device, feature_map="sigmoid", scale=1.0):
    B, H, L, S, D, M = shape
    if causal:
        S = L
    q = randn(gen, B, H, L, D, scale=scale)
    k = randn(gen, B, H, S, D, scale=scale)
    v = randn(gen, B, H, S, M)
    if feature_map == "identity":  # identity expects features: non-negative inputs
        q, k = q.abs(), k.abs()
    return [t.to(dtype=dtype, device=device) for t in (q, k, v)]


def check_parity(q, k, v, tol_dtype, gen, **options):
    """Output and gradients of the op against the reference run in float64 on the same inputs.

    Gradients are held to the spec's bound, except where the inputs make them ill-conditioned
    (relu features near 0, where <q + eps, K + eps> nears eps^2; L = 1, where the output is
    scale-invariant in q). There the error of the reference itself run in float32 on these inputs and
    their neighbours (helpers.reference_roundoff), rescaled to the unit roundoff of the dtype, estimates
    what any implementation must lose, and ours may lose up to 8x that. With L = S = 1 the true query and key gradients are
    O(eps / I^2) (the output is sigmoid(~1) v): they are compared on the scale |grad_out| |v| of the
    terms that cancel, or on their own where that is larger (a relu feature just above 0 makes I tiny).
    """
    def op(q_, k_, v_):
        return F.flow_attention(q_, k_, v_, **options)

    def ref(q_, k_, v_):
        return R.flow_attention(q_, k_, v_, **options)

    grad_out = randn(gen, *q.shape[:3], v.shape[3]).to(device=q.device, dtype=q.dtype)
    cpu_inputs = [t.detach().cpu() for t in (q, k, v)]
    out, g = grads(op, (q, k, v), grad_out)
    ref_out, ref_g = grads(ref, [t.double() for t in cpu_inputs], grad_out.double().cpu())
    roundoff = reference_roundoff(ref, cpu_inputs, [grad_out])
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert_close(out, ref_out, FORWARD_TOL[tol_dtype], "output")
    single_position = q.shape[2] == 1 and k.shape[2] == 1
    for name, a, b, lost in zip(("query", "key", "value"), g, ref_g, roundoff):
        assert a.dtype == q.dtype and a.shape == b.shape
        tol = conditioned_grad_tol(tol_dtype, lost)
        if single_position and name != "value":
            scale = max(grad_out.double().norm() * v.double().norm(), b.norm())
            err = ((a.double().cpu() - b).norm() / scale).item()
            assert err <= grad_tol(tol_dtype), f"grad {name}: error {err:.3e} on the scale |grad_out| |v|"
        else:
            assert_close(a, b, tol, f"grad {name}")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_parity(gen, shape, causal, feature_map, dtype, device):
    q, k, v = make_inputs(gen, shape, causal, dtype, device, feature_map)
    check_parity(q, k, v, dtype, gen, causal=causal, feature_map=feature_map)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("clamp", [1.0, 5.0, float("inf")])
@pytest.mark.parametrize("causal", [False, True])
def test_clamp(gen, clamp, causal, device):
    # Identity features of size ~3 make the conserved source exceed 1 and 5, so the clamp binds.
    q, k, v = make_inputs(gen, (2, 2, 24, 12, 6, 5), causal, torch.float32, device, "identity", scale=3.0)
    check_parity(q, k, v, torch.float32, gen, causal=causal, feature_map="identity", clamp=clamp)
    clamped = F.flow_attention(q, k, v, causal=causal, feature_map="identity", clamp=clamp)
    free = F.flow_attention(q, k, v, causal=causal, feature_map="identity", clamp=float("inf"))
    if clamp < 5:
        assert not torch.allclose(clamped, free), "inputs too small: the clamp did not bind"


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.1])
def test_eps(gen, eps, device):
    q, k, v = make_inputs(gen, (2, 2, 10, 8, 4, 3), False, torch.float32, device)
    check_parity(q, k, v, torch.float32, gen, eps=eps)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous(gen, causal, device):
    B, H, L, D, M = 2, 3, 14, 8, 6
    # (B, L, H, D) projections viewed as (B, H, L, D), a sliced key and an expanded value batch.
    q = randn(gen, B, L, H, D, device=device).transpose(1, 2)
    k = randn(gen, B, H, L, 2 * D, device=device)[..., ::2]
    v = randn(gen, 1, H, L, M, device=device).expand(B, H, L, M)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_parity(q, k, v, torch.float32, gen, causal=causal)
    contiguous = F.flow_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal)
    torch.testing.assert_close(F.flow_attention(q, k, v, causal=causal), contiguous, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_extreme_inputs_are_finite(gen, causal, dtype, device):
    for shape in [(1, 2, 16, 16, 8, 4), (1, 1, 1, 1, 1, 1), (2, 1, 5, 5, 1, 3)]:
        q, k, v = make_inputs(gen, shape, causal, dtype, device, scale=50.0)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        out = F.flow_attention(*leaves, causal=causal)
        out.sum().backward()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("causal", [False, True])
def test_large_sums_in_half_precision(gen, causal, device):
    # <q, sum k> reaches S * D > 65504: it must not be accumulated in float16.
    q, k, v = make_inputs(gen, (1, 1, 4096, 4096, 32, 4), causal, torch.float16, device, "relu", scale=4.0)
    q, k = q.abs() + 2, k.abs() + 2
    check_parity(q, k, v, torch.float16, gen, causal=causal, feature_map="identity")
