"""Packed sequences in causal_flow_attention (spec/flow_attention.md, "Packed sequences (cu_seqlens) follow
linear_attention.md"): with cu_seqlens (B == 1) each sequence runs alone from its row of the state.

The main check does not compare the op with itself: every sequence n has a prefix P_n and a body X_n; the
prefixes run packed (no state), their final states feed the packed bodies, and the outputs of both and
the gradients of every q, k, v (through the states) must equal the float64 reference's causal
Flow-Attention on each concatenation P_n X_n alone. Also: empty sequences, N = 0, padding masks, int32
and CPU offsets, float64 gradcheck, torch.library.opcheck, torch.compile and the errors."""

import itertools

import pytest
import torch

from flowformer import functional as F
from flowformer import reference as R
import helpers
from helpers import FORWARD_TOL, assert_close, devices, randn

OP = "flowformer::causal_flow_attention"
H, D, M = 2, 5, 4
# (prefix, body) lengths per sequence: length 1, empty prefixes and bodies, bodies across 64-row chunks.
SEQUENCES = [[(3, 1), (0, 0), (5, 70), (1, 0), (66, 9)], [(0, 4), (2, 130)]]


def offsets(lengths, dtype=torch.int64, device="cpu"):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=dtype, device=device)


def state_size():
    return 3 + 4 * D + D * M


def pack(batched):
    """(B, H, L, ...) as B sequences back to back: (1, H, B L, ...)."""
    return torch.cat(batched.unbind(0), 1)[None]


def pieces(gen, lengths, dtype, device):
    """(q, k, v) of the packed sequences, (1, H, sum(lengths), ...), leaves."""
    L = sum(lengths)
    return [randn(gen, 1, H, L, n, dtype=dtype, device=device).requires_grad_() for n in (D, D, M)]


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sequences", SEQUENCES)
@pytest.mark.parametrize("feature_map,clamp", [("sigmoid", 1.0), ("elu1", float("inf"))])
def test_packed_prefixes_then_bodies_equal_each_sequence_alone(gen, sequences, dtype, feature_map, clamp, device):
    prefix_lengths, body_lengths = zip(*sequences)
    prefix, body = pieces(gen, prefix_lengths, dtype, device), pieces(gen, body_lengths, dtype, device)
    options = dict(feature_map=feature_map, clamp=clamp)
    prefix_out, states = F.causal_flow_attention(*prefix, cu_seqlens=offsets(prefix_lengths, device=device), **options)
    assert states.shape == (len(sequences), H, state_size())
    body_out, final = F.causal_flow_attention(*body, state=states, cu_seqlens=offsets(body_lengths, device=device),
                                              **options)
    assert final.shape == states.shape
    assert (final[:, :, 0] == torch.tensor([p + b for p, b in sequences], dtype=final.dtype, device=device)[:, None]).all()
    grads = [randn(gen, *out.shape, dtype=dtype, device=device) for out in (prefix_out, body_out)]
    torch.autograd.backward([prefix_out, body_out], grads)

    cuts = [offsets(lengths).tolist() for lengths in (prefix_lengths, body_lengths)]
    for n, (p, b) in enumerate(sequences):
        if p + b == 0:
            continue
        spans = [slice(cuts[0][n], cuts[0][n + 1]), slice(cuts[1][n], cuts[1][n + 1])]
        alone = [torch.cat([part[:, :, spans[0]], whole[:, :, spans[1]]], 2).detach().double()
                 for part, whole in zip(prefix, body)]
        grad = torch.cat([grads[0][:, :, spans[0]], grads[1][:, :, spans[1]]], 2).double()
        out, expected = helpers.grads(lambda *x: R.flow_attention(*x, causal=True, **options), alone, grad)
        # A short sequence's gradients can be ill-conditioned (near-cancelling terms): the reference in float32
        # on these inputs and their neighbours says by how much (helpers.conditioned_grad_tol).
        roundoff = helpers.reference_roundoff(lambda *x: R.flow_attention(*x, causal=True, **options), alone,
                                              [grad])
        what = f"sequence {n} ({p} + {b})"
        tol = FORWARD_TOL[dtype] * (1 if dtype == torch.bfloat16 else 10)
        assert_close(torch.cat([prefix_out[:, :, spans[0]], body_out[:, :, spans[1]]], 2), out, tol, f"{what}: out")
        for name, leaf_prefix, leaf_body, g, lost in zip("qkv", prefix, body, expected, roundoff):
            got = torch.cat([leaf_prefix.grad[:, :, spans[0]], leaf_body.grad[:, :, spans[1]]], 2)
            tol = (1 if dtype == torch.bfloat16 else 10) * helpers.conditioned_grad_tol(dtype, lost)
            assert_close(got, g, tol, f"{what}: grad {name}")


@pytest.mark.parametrize("device", devices(OP))
def test_packed_equals_batched_with_masks_and_empty_sequences(gen, device):
    # Three sequences of the same length as a batch, and packed with empty ones between them: the same
    # outputs, states and gradients (padding masks included, every state row its own).
    B, L = 3, 40
    q, k, v = (randn(gen, B, H, L, n, device=device, dtype=torch.float64) for n in (D, D, M))
    pad = (torch.rand(B, L, generator=gen) < 0.25).to(device)
    _, state = F.causal_flow_attention(*(randn(gen, B, H, 7, n, device=device, dtype=torch.float64) for n in (D, D, M)))
    batched = [t.clone().requires_grad_() for t in (q, k, v, state)]
    out_b, final_b = F.causal_flow_attention(*batched[:3], state=batched[3], key_padding_mask=pad)
    lengths = [L, 0, L, L, 0]
    slots = [0, None, 1, 2, None]  # which batch element each packed sequence is
    packed = [pack(t).detach().requires_grad_() for t in (q, k, v)]
    zero = torch.zeros(1, H, state_size(), dtype=torch.float64, device=device)
    packed_state = torch.cat([state[i:i + 1] if i is not None else zero for i in slots]).requires_grad_()
    out_p, final_p = F.causal_flow_attention(*packed, state=packed_state, key_padding_mask=pad.reshape(1, -1),
                                             cu_seqlens=offsets(lengths, torch.int32))
    assert_close(out_p, pack(out_b), 1e-12, "out")
    assert_close(final_p[[0, 2, 3]], final_b, 1e-12, "final states")
    assert torch.equal(final_p[[1, 4]], packed_state[[1, 4]].detach())  # empty sequences pass their state through
    grad_out, grad_state = randn(gen, *out_b.shape, dtype=torch.float64, device=device), torch.randn_like(final_b)
    torch.autograd.backward([out_b, final_b], [grad_out, grad_state])
    torch.autograd.backward([out_p, final_p[[0, 2, 3]]], [pack(grad_out), grad_state])
    for name, p, b in zip("qkv", packed, batched):
        assert_close(p.grad, pack(b.grad), 1e-12, f"grad {name}")
    assert_close(packed_state.grad[[0, 2, 3]], batched[3].grad, 1e-12, "grad state")


def test_no_sequences(gen):
    q, k, v = (torch.zeros(1, H, 0, n) for n in (D, D, M))
    out, state = F.causal_flow_attention(q, k, v, cu_seqlens=torch.tensor([0]))
    assert out.shape == (1, H, 0, M) and state.shape == (0, H, state_size()) and state.dtype == torch.float32


def test_gradcheck_through_the_packed_states(gen):
    lengths = [3, 0, 4]
    q, k, v = (randn(gen, 1, 2, 7, 3, dtype=torch.float64).requires_grad_() for _ in range(3))
    # All of the state but its count n (an integer: no gradient); clamp = inf, as test_flow_attention_state.py.
    _, state = F.causal_flow_attention(*(randn(gen, 3, 2, 2, 3, dtype=torch.float64) for _ in range(3)),
                                       clamp=float("inf"))
    count, rest = state[..., :1], state[..., 1:].clone().requires_grad_()
    cu = offsets(lengths)

    def run(q, k, v, rest):
        return F.causal_flow_attention(q, k, v, state=torch.cat([count, rest], -1), cu_seqlens=cu, clamp=float("inf"))

    assert torch.autograd.gradcheck(run, (q, k, v, rest), atol=1e-7, rtol=1e-5)


def test_opcheck_with_cu_seqlens(gen):
    q, k, v = (randn(gen, 1, 2, 9, 3, dtype=torch.float64).requires_grad_() for _ in range(3))
    cu = offsets([4, 0, 5])
    torch.library.opcheck(torch.ops.flowformer.causal_flow_attention.default, (q, k, v), {"cu_seqlens": cu})
    options = {"feature_map": "sigmoid", "eps": 1e-6, "clamp": 1.0, "state": None, "query_padding_mask": None,
               "key_padding_mask": None, "cu_seqlens": cu}
    torch.library.opcheck(torch.ops.flowformer.causal_flow_attention_backward.default,
                          (torch.randn(1, 2, 9, 3, dtype=torch.float64), torch.randn(3, 2, 3 + 12 + 9,
                           dtype=torch.float64), q.detach(), k.detach(), v.detach()), options)


def test_compile_fullgraph_with_cu_seqlens(gen):
    q, k, v = (randn(gen, 1, H, 12, n).requires_grad_() for n in (D, D, M))
    cu = offsets([5, 7])

    @torch.compile(fullgraph=True, backend="aot_eager")
    def run(q, k, v):
        out, state = F.causal_flow_attention(q, k, v, cu_seqlens=cu)
        return out.square().sum() + state.sum()

    compiled = torch.autograd.grad(run(q, k, v), (q, k, v))
    out, state = F.causal_flow_attention(q, k, v, cu_seqlens=cu)
    eager = torch.autograd.grad(out.square().sum() + state.sum(), (q, k, v))
    for c, e in zip(compiled, eager):
        assert_close(c, e, 1e-6)


def test_errors_name_the_argument(gen):
    q, k, v = (randn(gen, 1, H, 6, n) for n in (D, D, M))
    with pytest.raises(RuntimeError, match=r"causal_flow_attention: query must have batch size B = 1"):
        F.causal_flow_attention(*(t.expand(2, -1, -1, -1) for t in (q, k, v)), cu_seqlens=offsets([6]))
    with pytest.raises(RuntimeError, match=r"causal_flow_attention: state must have shape \(N, H, 3 \+ 4 D \+ D M\) = "
                                           r"\(2, 2, 43\)"):
        F.causal_flow_attention(q, k, v, state=torch.zeros(1, H, state_size()), cu_seqlens=offsets([2, 4]))
    with pytest.raises(RuntimeError, match=r"causal_flow_attention: cu_seqlens must end with the total length L = 6"):
        F.causal_flow_attention(q, k, v, cu_seqlens=offsets([2, 3]))
    with pytest.raises(RuntimeError, match=r"causal_flow_attention: cu_seqlens must be non-decreasing"):
        F.causal_flow_attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 3, 6]))
    with pytest.raises(RuntimeError, match=r"causal_flow_attention: cu_seqlens must start with 0"):
        F.causal_flow_attention(q, k, v, cu_seqlens=torch.tensor([1, 6]))
    with pytest.raises(RuntimeError, match=r"causal_flow_attention: cu_seqlens must be int32 or int64"):
        F.causal_flow_attention(q, k, v, cu_seqlens=torch.tensor([0.0, 6.0]))
