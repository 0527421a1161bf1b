"""causal_flow_attention: the recurrent state of causal Flow-Attention (spec/flow_attention.md, "Recurrent
state of the causal mode"): pieces carrying the state equal one causal run, forward and gradients;
token-by-token decoding equals the full run; padding leaves the state unchanged; the layout; gradcheck
through the state; errors."""

import pytest
import torch

from flowformer import functional as F
from helpers import FORWARD_TOL, assert_close, devices, grad_tol, randn

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


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cuts", [(), (1,), (37, 90)])
@pytest.mark.parametrize("state_in_loss", [False, True])
def test_pieces_carry_gradients(gen, cuts, state_in_loss, dtype, device):
    # The gradients through pieces carrying the state (of out, and of the last state when it is in the loss)
    # equal those of one run; without pieces they equal flow_attention(causal=True)'s.
    B, H, L, D, M = 2, 2, 130, 5, 4
    q, k, v = (randn(gen, B, H, L, n, dtype=dtype, device=device) for n in (D, D, M))
    pad = torch.rand(B, L, generator=gen) < 0.2
    pad[:, 0] = False
    pad = pad.to(device)
    grad_out = randn(gen, B, H, L, M, dtype=dtype, device=device)
    state_weights = torch.rand(state_size(D, M), generator=gen).to(device)

    def run(cuts):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        state, outs, start = None, [], 0
        for end in (*cuts, L):
            out, state = F.causal_flow_attention(*(t[:, :, start:end] for t in leaves), state=state, clamp=5.0,
                                                 query_padding_mask=pad[:, start:end])
            outs.append(out)
            start = end
        loss = (torch.cat(outs, 2) * grad_out).float().sum()
        if state_in_loss:
            loss = loss + (state * state_weights).sum()
        return torch.autograd.grad(loss, leaves)

    whole = run(())
    if not state_in_loss:
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = F.flow_attention(*leaves, causal=True, clamp=5.0, query_padding_mask=pad)
        reference = torch.autograd.grad((out * grad_out).float().sum(), leaves)
        for name, a, b in zip(("query", "key", "value"), whole, reference):
            assert_close(a, b, grad_tol(dtype), f"grad {name} (one piece)")
    for name, a, b in zip(("query", "key", "value"), run(cuts), whole):
        assert_close(a, b, grad_tol(dtype) * (1 if dtype == torch.bfloat16 else 10), f"grad {name}")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("padded", [False, True])
def test_gradcheck_through_the_state(gen, padded, device):
    # float64, to query, key, value and the incoming state (all but its count n, an integer that gets no
    # gradient), of out and of the final state. clamp = inf: a clamped source ties with the running maximum
    # m, where the state's m has no derivative.
    B, H, L, D, M = 2, 2, 6, 3, 2
    q, k, v = (randn(gen, B, H, L + 4, n, dtype=torch.float64, device=device) for n in (D, D, M))
    pad = torch.rand(B, L, generator=gen).to(device) < 0.3 if padded else None
    _, state = F.causal_flow_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], clamp=float("inf"))
    count = state[..., :1]

    def fn(query, key, value, rest):
        return F.causal_flow_attention(query, key, value, state=torch.cat([count, rest], -1), clamp=float("inf"),
                                       key_padding_mask=pad)

    inputs = [t.detach().clone().requires_grad_(True) for t in (q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], state[..., 1:])]
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-7, rtol=1e-5)
    # From no state: out and the final state.
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    whole_pad = None if pad is None else torch.cat([pad, pad[:, :4]], 1)
    assert torch.autograd.gradcheck(
        lambda *x: F.causal_flow_attention(*x, clamp=float("inf"), key_padding_mask=whole_pad), leaves, atol=1e-7,
        rtol=1e-5)


def test_opcheck_of_the_gradients(gen):
    q, k, v = (randn(gen, 2, 2, 7, 3, dtype=torch.float64).requires_grad_() for _ in range(3))
    _, state = F.causal_flow_attention(q[:, :, :3].detach(), k[:, :, :3].detach(), v[:, :, :3].detach())
    state.requires_grad_()
    torch.library.opcheck(torch.ops.flowformer.causal_flow_attention.default, (q, k, v), {"state": state})
    grad_out, grad_state = torch.randn(2, 2, 7, 3, dtype=torch.float64), torch.randn_like(state)
    options = {"feature_map": "sigmoid", "eps": 1e-6, "clamp": 1.0, "state": state.detach(),
               "query_padding_mask": None, "key_padding_mask": None}
    torch.library.opcheck(torch.ops.flowformer.causal_flow_attention_backward.default,
                          (grad_out, grad_state, q.detach(), k.detach(), v.detach()), options)


def test_errors(gen):
    q, k, v = (randn(gen, 2, 2, 5, 4).requires_grad_() for _ in range(3))
    out, state = F.causal_flow_attention(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)
    with pytest.raises(RuntimeError, match="causal_flow_attention_backward: double backward"):
        torch.autograd.grad(grads[0].sum(), q)
    with pytest.raises(RuntimeError, match=r"causal_flow_attention_backward: grad_state must have shape"):
        torch.ops.flowformer.causal_flow_attention_backward(
            out.detach(), torch.zeros(2, 2, 34), q.detach(), k.detach(), v.detach(), feature_map="sigmoid", eps=1e-6,
            clamp=1.0, state=None, query_padding_mask=None, key_padding_mask=None)
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


@pytest.mark.parametrize("device", devices(OP))
def test_an_empty_piece_passes_the_state_and_its_gradient(gen, device):
    # L = 0 between two pieces: the same outputs and gradients as the two pieces alone (the backward of an
    # empty piece once took the largest of no sources).
    B, H, L, D, M = 2, 2, 9, 3, 4
    q, k, v = (randn(gen, B, H, L, n, dtype=torch.float64, device=device).requires_grad_() for n in (D, D, M))
    first, state = F.causal_flow_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4])
    empty, passed = F.causal_flow_attention(q[:, :, 4:4], k[:, :, 4:4], v[:, :, 4:4], state=state)
    assert empty.shape == (B, H, 0, M) and torch.equal(passed, state)
    second, final = F.causal_flow_attention(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], state=passed)
    grad_out, grad_final = randn(gen, B, H, L, M, dtype=torch.float64, device=device), torch.randn_like(final)
    got = torch.autograd.grad([torch.cat([first, second], 2), final], (q, k, v), [grad_out, grad_final])
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, final_whole = F.causal_flow_attention(*leaves)
    expected = torch.autograd.grad([out, final_whole], leaves, [grad_out, grad_final])
    for name, a, b in zip("qkv", got, expected):
        assert_close(a, b, 1e-12, f"grad {name}")
