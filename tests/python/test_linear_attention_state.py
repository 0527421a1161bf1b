"""The recurrent state of causal_linear_attention (spec/linear_attention.md, "Properties"): running a
sequence in pieces while carrying the state equals one run, forward and gradients; a token-by-token
decoding loop equals the full run."""

import pytest
import torch

from flowformer import functional as F
from helpers import FORWARD_TOL, assert_close, devices, grad_tol, randn

OP = "flowformer::causal_linear_attention"


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("cuts", [(1,), (64,), (37, 90), (1, 2, 3, 150)])
def test_continuation_with_gradients(gen, cuts, normalize, device):
    B, H, L, D, M = 2, 2, 160, 6, 5
    q, k, v = (randn(gen, B, H, L, n, dtype=torch.float64, device=device) for n in (D, D, M))
    kv0 = randn(gen, B, H, D, M, dtype=torch.float64, device=device)
    z0 = torch.rand(B, H, D, generator=gen, dtype=torch.float64).add(1).to(device)
    grad_out = randn(gen, B, H, L, M, dtype=torch.float64, device=device)
    grad_kv = randn(gen, B, H, D, M, dtype=torch.float64, device=device)
    grad_z = randn(gen, B, H, D, dtype=torch.float64, device=device)

    def run(pieces):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, kv0, z0)]
        qq, kk, vv, kv, z = leaves
        outs, start = [], 0
        for end in (*pieces, L):
            out, kv, z = F.causal_linear_attention(qq[:, :, start:end], kk[:, :, start:end], vv[:, :, start:end],
                                                   normalize=normalize, initial_kv=kv, initial_z=z)
            outs.append(out)
            start = end
        out = torch.cat(outs, 2)
        loss = (out * grad_out).sum() + (kv * grad_kv).sum() + (z * grad_z).sum()
        return (out, kv, z), torch.autograd.grad(loss, leaves)

    whole, whole_grads = run(())
    pieces, piece_grads = run(cuts)
    for name, a, b in zip(("out", "final_kv", "final_z"), pieces, whole):
        assert_close(a, b, 1e-12, name)
    for name, a, b in zip(("query", "key", "value", "initial_kv", "initial_z"), piece_grads, whole_grads):
        assert_close(a, b, 1e-12, f"grad {name}")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature_map", ["elu1", "relu"])
def test_decoding_loop_equals_full_run(gen, feature_map, dtype, device):
    B, H, L, D, M = 2, 3, 40, 8, 4
    q, k, v = (randn(gen, B, H, L, n, dtype=dtype, device=device) for n in (D, D, M))
    out, kv, z = F.causal_linear_attention(q, k, v, feature_map=feature_map)
    state_kv = state_z = None
    steps = []
    for t in range(L):
        step, state_kv, state_z = F.causal_linear_attention(
            q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], feature_map=feature_map, initial_kv=state_kv,
            initial_z=state_z)
        assert state_kv.shape == (B, H, D, M) and state_z.shape == (B, H, D)
        steps.append(step)
    tol = FORWARD_TOL[dtype]
    assert_close(torch.cat(steps, 2), out, tol, "decoded outputs")
    assert_close(state_kv, kv, FORWARD_TOL[torch.float32], "final_kv")
    assert_close(state_z, z, FORWARD_TOL[torch.float32], "final_z")


@pytest.mark.parametrize("device", devices(OP))
def test_gradient_through_decoding_steps(gen, device):
    # Gradients flow through the carried state from the last step back to the first inputs.
    B, H, L, D, M = 1, 2, 6, 3, 2
    q, k, v = (randn(gen, B, H, L, n, dtype=torch.float64, device=device).requires_grad_() for n in (D, D, M))
    kv = z = None
    outs = []
    for t in range(L):
        out, kv, z = F.causal_linear_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                               initial_kv=kv, initial_z=z)
        outs.append(out)
    stepped = torch.autograd.grad(torch.cat(outs, 2).square().sum(), (q, k, v))
    full = torch.autograd.grad(F.causal_linear_attention(q, k, v)[0].square().sum(), (q, k, v))
    for a, b in zip(stepped, full):
        assert_close(a, b, grad_tol(torch.float64), "gradient")
