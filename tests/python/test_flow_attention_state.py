"""causal_flow_attention: the recurrent state of causal Flow-Attention (spec/flow_attention.md, "Recurrent
state of the causal mode"): pieces carrying the state equal one causal run; token-by-token decoding equals
the full run; padding leaves the state unchanged; the layout; errors."""

import pytest
import torch

from flowformer import functional as F
from helpers import FORWARD_TOL, assert_close, devices, randn

OP = "flowformer::causal_flow_attention"


def state_size(D, M):
    return 3 + 4 * D + D * M


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("cuts", [(), (1,), (64,), (37, 90), (1, 2, 3, 150)])
@pytest.mark.parametrize("clamp", [1.0, float("inf")])
def test_pieces_equal_one_causal_run(gen, cuts, dtype, clamp, device):
    B, H, L, D, M = 2, 2, 160, 5, 4
    q, k, v = (randn(gen, B, H, L, n, dtype=dtype, device=device) for n in (D, D, M))
    pad = torch.rand(B, L, generator=gen) < 0.2
    pad[:, 0] = False
    pad = pad.to(device)
    options = dict(clamp=clamp, key_padding_mask=pad)
    expected = F.flow_attention(q, k, v, causal=True, **options)
    state, outs, start = None, [], 0
    for end in (*cuts, L):
        out, state = F.causal_flow_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], state=state,
                                             clamp=clamp, key_padding_mask=pad[:, start:end])
        outs.append(out)
        start = end
    assert state.shape == (B, H, state_size(D, M))
    assert state.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(torch.cat(outs, 2), expected, FORWARD_TOL[dtype] * (1 if dtype == torch.bfloat16 else 10), "out")
    assert (state[:, :, 0] == (~pad).sum(1, keepdim=True).to(state.dtype)).all()  # n counts valid positions


@pytest.mark.parametrize("device", devices(OP))
def test_token_by_token_decoding_equals_the_full_run(gen, device):
    B, H, L, D, M = 2, 3, 50, 8, 8
    q, k, v = (randn(gen, B, H, L, n, device=device) for n in (D, D, M))
    expected = F.flow_attention(q, k, v, causal=True, feature_map="elu1", clamp=5.0)
    state, steps = None, []
    with torch.no_grad():
        for t in range(L):
            out, state = F.causal_flow_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state=state,
                                                 feature_map="elu1", clamp=5.0)
            steps.append(out)
    assert_close(torch.cat(steps, 2), expected, 1e-5, "decoded outputs")


def test_state_layout_holds_the_prefix_sums(gen):
    B, H, L, D, M = 1, 2, 9, 3, 2
    q, k, v = (randn(gen, B, H, L, n, dtype=torch.float64) for n in (D, D, M))
    _, state = F.causal_flow_attention(q, k, v)
    qf, kf = torch.sigmoid(q), torch.sigmoid(k)
    assert torch.allclose(state[..., 3:3 + D], kf.sum(2))                  # sum k
    assert torch.allclose(state[..., 3 + D:3 + 2 * D], qf.sum(2))          # sum q
    assert (state[..., 0] == L).all() and (state[..., 2] >= 1).all()       # n, E >= 1 (holds the maximum)


def test_padded_positions_leave_the_state_unchanged(gen):
    q, k, v = (randn(gen, 2, 2, 6, 4) for _ in range(3))
    _, state = F.causal_flow_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3])
    pad = torch.ones(2, 3, dtype=torch.bool)
    out, same = F.causal_flow_attention(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], state=state, query_padding_mask=pad)
    assert torch.equal(same, state) and (out == 0).all()


def test_errors(gen):
    q, k, v = (randn(gen, 2, 2, 5, 4).requires_grad_() for _ in range(3))
    with pytest.raises(RuntimeError, match="causal_flow_attention: has no gradient"):
        F.causal_flow_attention(q, k, v)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"state must have shape \(B, H, 3 \+ 4 D \+ D M\) = \(2, 2, 35\)"):
            F.causal_flow_attention(q, k, v, state=torch.zeros(2, 2, 34))
        with pytest.raises(RuntimeError, match="state must be Float"):
            F.causal_flow_attention(q, k, v, state=torch.zeros(2, 2, 35, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="requires query and key of the same length"):
            F.causal_flow_attention(q, k[:, :, :4], v[:, :, :4])


def test_opcheck(gen):
    q, k, v = (randn(gen, 2, 2, 7, 3) for _ in range(3))
    _, state = F.causal_flow_attention(q, k, v)
    torch.library.opcheck(torch.ops.flowformer.causal_flow_attention.default, (q, k, v), {"state": state})
    torch.library.opcheck(torch.ops.flowformer.causal_flow_attention.default, (q[:, :, :1], k[:, :, :1], v[:, :, :1]),
                          {"state": state, "clamp": float("inf")})
