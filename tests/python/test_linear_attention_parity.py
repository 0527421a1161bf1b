"""causal_linear_attention and linear_attention against the float64 reference of spec/linear_attention.md:
outputs, final states and gradients (initial states included), every dtype, feature map, stride."""

import pytest
import torch

from flowformer import functional as F
from flowformer import reference as R
from helpers import (DTYPES, FORWARD_TOL, assert_close, conditioned_grad_tol, devices, features_input, grad_tol,
                     grads_of, randn, reference_roundoff)

CAUSAL = "flowformer::causal_linear_attention"
NONCAUSAL = "flowformer::linear_attention"
FEATURE_MAPS = ["elu1", "relu", "sigmoid", "identity"]
# (B, H, L, D, M): L = 1 (a decoding step), D = 1, D != M, odd sizes, several chunks of 64 rows; then head
# dims of the fused CUDA kernels (bf16 and half: kernels/linear_attention), across chunks, with value tiles
# (D 128, M 32: two in the backward; D 32, M 128: two in both passes).
SHAPES = [(2, 3, 17, 5, 6), (1, 2, 1, 4, 4), (2, 2, 11, 1, 3), (1, 3, 33, 7, 2), (1, 2, 200, 4, 3),
          (1, 2, 150, 16, 32), (1, 1, 70, 64, 64), (1, 1, 65, 128, 32), (2, 1, 40, 32, 128)]


def states(gen, B, H, D, M, dtype, device):
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    kv = randn(gen, B, H, D, M, dtype=state_dtype, device=device)
    z = (torch.rand(B, H, D, generator=gen, dtype=torch.float64) + 1).to(state_dtype).to(device)
    return kv, z


def assert_cancelling_terms_close(actual, expected, grad_out, value, dtype, name):
    """A gradient whose true value is O(eps), compared on the scale |grad_out| |v| of the terms that cancel."""
    scale = grad_out.double().norm() * value.double().norm()
    err = ((actual.double().cpu() - expected).norm() / scale).item()
    assert err <= grad_tol(dtype), f"grad {name}: error {err:.3e} on the scale |grad_out| |v|"


@pytest.mark.parametrize("device", devices(CAUSAL))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_causal_parity(gen, shape, with_state, normalize, feature_map, dtype, device):
    B, H, L, D, M = shape
    q = features_input(gen, (B, H, L, D), feature_map, dtype, device)
    k = features_input(gen, (B, H, L, D), feature_map, dtype, device)
    v = randn(gen, B, H, L, M, dtype=dtype, device=device)
    kv0, z0 = states(gen, B, H, D, M, dtype, device)
    options = dict(feature_map=feature_map, normalize=normalize)

    def op(q_, k_, v_, kv_, z_):
        return F.causal_linear_attention(q_, k_, v_, initial_kv=kv_ if with_state else None,
                                         initial_z=z_ if with_state else None, **options)

    def ref(q_, k_, v_, kv_, z_):
        return R.causal_linear_attention(q_, k_, v_, initial_kv=kv_ if with_state else None,
                                         initial_z=z_ if with_state else None, **options)

    grad_outputs = [randn(gen, B, H, L, M, dtype=dtype, device=device), *states(gen, B, H, D, M, dtype, device)]
    inputs = (q, k, v, kv0, z0)
    outs, g = grads_of(op, inputs, grad_outputs)
    ref_outs, ref_g = grads_of(ref, [t.double().cpu() for t in inputs], [t.double().cpu() for t in grad_outputs])
    roundoff = reference_roundoff(ref, inputs, grad_outputs)
    assert outs[0].dtype == dtype and outs[1].dtype == kv0.dtype and outs[2].dtype == z0.dtype
    for name, a, b in zip(("out", "final_kv", "final_z"), outs, ref_outs):
        assert_close(a, b, FORWARD_TOL[dtype], name)
    names = ("query", "key", "value", "initial_kv", "initial_z")
    # Normalised outputs that do not depend on the scale of q (D = 1), or of q and k (one position, no
    # state: out = v), have O(eps) true gradients there, left from cancelling terms.
    scale_invariant = {"query"} if D == 1 else set()
    if L == 1 and not with_state:
        scale_invariant |= {"query", "key"}
    for name, a, b, lost in zip(names, g, ref_g, roundoff):
        if not with_state and name.startswith("initial"):
            continue
        if b.norm() == 0:  # initial_z does not reach an unnormalised output
            assert a.abs().max() == 0, f"grad {name} must be 0"
        elif normalize and name in scale_invariant:
            assert_cancelling_terms_close(a, b, grad_outputs[0], v, dtype, name)
        else:
            assert_close(a, b, conditioned_grad_tol(dtype, lost), f"grad {name}")


@pytest.mark.parametrize("device", devices(NONCAUSAL))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("L,S", [(17, 13), (1, 9), (9, 1), (300, 270)])
@pytest.mark.parametrize("D,M", [(5, 4), (16, 32)])  # off and on the fused kernels' head dims
def test_noncausal_parity(gen, D, M, L, S, masked, feature_map, dtype, device):
    B, H = 2, 3
    q = features_input(gen, (B, H, L, D), feature_map, dtype, device)
    k = features_input(gen, (B, H, S, D), feature_map, dtype, device)
    v = randn(gen, B, H, S, M, dtype=dtype, device=device)
    mask = None
    if masked:
        mask = torch.rand(B, S, generator=gen) < 0.3
        mask[:, 0] = False
        mask = mask.to(device)
    options = dict(feature_map=feature_map, key_padding_mask=mask)
    grad_out = randn(gen, B, H, L, M, dtype=dtype, device=device)
    outs, g = grads_of(lambda *x: F.linear_attention(*x, **options), (q, k, v), [grad_out])
    ref_mask = None if mask is None else mask.cpu()
    def ref(*x):
        return R.linear_attention(*x, feature_map=feature_map, key_padding_mask=ref_mask)

    ref_outs, ref_g = grads_of(ref, [t.double().cpu() for t in (q, k, v)], [grad_out.double().cpu()])
    roundoff = reference_roundoff(ref, (q, k, v), [grad_out])
    assert outs[0].dtype == dtype
    assert_close(outs[0], ref_outs[0], FORWARD_TOL[dtype], "out")
    for name, a, b, lost in zip(("query", "key", "value"), g, ref_g, roundoff):
        if S == 1 and name != "value":  # out = v: O(eps) gradients, as above
            assert_cancelling_terms_close(a, b, grad_out, v, dtype, name)
        else:
            assert_close(a, b, conditioned_grad_tol(dtype, lost), f"grad {name}")
    if masked:  # padded keys get no gradient
        for grad in g[1:]:
            assert (grad.masked_select(mask[:, None, :, None]) == 0).all()


@pytest.mark.parametrize("device", devices(CAUSAL))
@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous(gen, causal, device):
    B, L, H, D = 2, 70, 3, 4
    q, k, v = (randn(gen, B, L, H, D, device=device).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    fn = F.causal_linear_attention if causal else F.linear_attention
    ref = R.causal_linear_attention if causal else R.linear_attention
    out = fn(q, k, v)
    expected = ref(*(t.double() for t in (q, k, v)))
    if causal:
        out, expected = out[0], expected[0]
    assert_close(out, expected, FORWARD_TOL[torch.float32], "out")


@pytest.mark.parametrize("device", devices(CAUSAL))
def test_large_sums_in_half_precision(gen, device):
    # sum_j phi(k_j) v_j reaches thousands: accumulation must not be in float16.
    B, H, L, D = 1, 1, 4096, 8
    q, k = (randn(gen, B, H, L, D, dtype=torch.float16, device=device).abs() + 4 for _ in range(2))
    v = randn(gen, B, H, L, D, dtype=torch.float16, device=device) + 8
    out, kv, z = F.causal_linear_attention(q, k, v, feature_map="identity", normalize=False)
    ref_out, ref_kv, _ = R.causal_linear_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                                   feature_map="identity", normalize=False)
    assert ref_out.abs().max() > 65504 and kv.abs().max() > 65504
    finite = ref_out.abs() <= 65504  # float16 outputs beyond its range are inf, as in any float16 op
    assert torch.isfinite(out[finite]).all()
    assert_close(kv, ref_kv, FORWARD_TOL[torch.float32] * 10, "final_kv")


@pytest.mark.parametrize("device", devices(NONCAUSAL))
@pytest.mark.parametrize("dtype", DTYPES)
def test_noncausal_padded_keys_holding_nan_count_for_nothing(gen, dtype, device):
    # Whatever padded keys and values hold (NaN here) is left out: the same output and gradients as with
    # finite values there, and no gradient for them.
    q, k, v = (randn(gen, 2, 2, 70, 16, dtype=dtype, device=device) for _ in range(3))
    mask = torch.zeros(2, 70, dtype=torch.bool)
    mask[:, 1::3] = True
    mask = mask.to(device)
    grad_out = randn(gen, 2, 2, 70, 16, dtype=dtype, device=device)
    run = lambda *inputs: grads_of(lambda *x: F.linear_attention(*x, key_padding_mask=mask), inputs, grad_out)
    (expected,), expected_grads = run(q, k, v)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, 1::3] = float("nan")
    v_nan[:, :, 1::3] = float("nan")
    (out,), grads = run(q, k_nan, v_nan)
    assert_close(out, expected, FORWARD_TOL[dtype], "out")
    for name, a, b in zip(("query", "key", "value"), grads, expected_grads):
        assert_close(a, b, grad_tol(dtype), f"grad {name}")
        assert not a.isnan().any(), f"grad {name}"
    assert (grads[1][:, :, 1::3] == 0).all() and (grads[2][:, :, 1::3] == 0).all()
