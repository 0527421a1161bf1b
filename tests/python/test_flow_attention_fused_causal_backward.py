"""The gradients of causal flow_attention and causal_flow_attention at the head dims of the fused CUDA kernels (the
backward's three passes, kernels/flow_attention/causal_{query_grads,key_grads,chain}.cuh, run in the SIMT emulator
by `make test-emulated`; bf16 and half, and float32 as three tf32 products): against autograd through the float64
reference across chunks, feature maps, clamps, masks, head dims and value tiles; strided inputs; the incoming
and final states' gradients; packed sequences in one launch; every element written; determinism; extreme inputs."""

import functools
import os

import pytest
import torch

from flowformer import functional as F
from flowformer import reference as R
import helpers
from helpers import PADDINGS, assert_close, devices, features_input, grad_tol, grads, grads_of, ops_made, \
    padding_masks, randn

OP = "flowformer::causal_flow_attention"
FUSED_DTYPES = [torch.bfloat16, torch.float16, torch.float32]  # float32: three tf32 products


def inputs(gen, B, H, L, D, M, dtype, device, feature_map="sigmoid", scale=1.0):
    if scale != 1.0:
        q, k = (randn(gen, B, H, L, D, dtype=dtype, device=device, scale=scale) for _ in range(2))
    else:
        q, k = (features_input(gen, (B, H, L, D), feature_map, dtype, device) for _ in range(2))
    return q, k, randn(gen, B, H, L, M, dtype=dtype, device=device)


def fused(device):
    """Whether the op runs the fused kernels (on a GPU, or emulated), which multiply the features in the inputs'
    dtype; the CPU backend computes them in float32."""
    return device == "cuda" or os.environ.get("FLOWFORMER_EMULATE_CUDA") == "1"


def rounded_features(x, feature_map, dtype):
    """phi(x) in float64 rounded to `dtype` (float64: as it is), as the tensor-core kernels multiply the features
    (straight through: phi' exact). Two steps of the gradient are discontinuous: the clamp's gate on the conserved source, and the
    final state's dm, which goes to the largest source's row. A source within the features' rounding (2^-8 in bf16)
    of the clamp, or of the largest, may fall on the other side of it in the kernels, and its row's gradient with
    it: with sigmoid and elu1 features at clamp 1, where the sources crowd, dk moved by up to 10% against the exact
    reference in bf16 (a near tie for the largest source: 2% in half). So the fused kernels' gradients are checked on
    their operands (the forward's tests bound what the rounding itself costs), the CPU backend's, in float32 from
    the exact features, on those."""
    f = R.apply_feature_map(x, feature_map)
    return f + (f.to(dtype).double() - f).detach()


def on_rounded_features(q, k, v, feature_map="sigmoid", **options):
    """The float64 reference of causal flow_attention on rounded_features (to the op's dtype: options' dtype)."""
    dtype = options.pop("dtype")
    fq, fk = (rounded_features(x, feature_map, dtype) for x in (q, k))
    return R.flow_attention(fq, fk, v, causal=True, feature_map="identity", **options)


def check_gradients(q, k, v, gen, **options):
    """helpers.check_gradients of the causal op against on_rounded_features (the exact features on the CPU
    backend)."""
    dtype = q.dtype if fused(q.device.type) else torch.float64
    return helpers.check_gradients(functools.partial(F.flow_attention, causal=True),
                                   functools.partial(on_rounded_features, dtype=dtype), q, k, v, gen, **options)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("feature_map", ["sigmoid", "elu1", "relu", "identity"])
@pytest.mark.parametrize("clamp", [1.0, 0.05, float("inf")])
def test_fused_causal_gradients_match_the_reference(gen, feature_map, clamp, dtype, device):
    # 150 rows: two whole chunks and a partial one; D = 16, M = 32: one value tile. Clamp 0.05 cuts most sources.
    q, k, v = inputs(gen, 1, 2, 150, 16, 32, dtype, device, feature_map)
    check_gradients(q, k, v, gen, feature_map=feature_map, clamp=clamp)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_fused_causal_gradients_eps_terms(gen, dtype, device):
    # eps = 0.5: each eps term of the normalisers' gradients counts; keys rising along the sequence so that the
    # competition's running maximum moves.
    q, k, v = inputs(gen, 2, 2, 140, 16, 16, dtype, device, "elu1")
    k = k + torch.linspace(0, 2, 140, device=device, dtype=torch.float32).to(dtype)[:, None]
    check_gradients(q, k, v, gen, eps=0.5, clamp=float("inf"), feature_map="elu1")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("D,M", [(64, 64), (128, 64), (256, 32), (32, 256), (64, 16)])
def test_fused_causal_gradients_head_dims_and_value_tiles(gen, D, M, dtype, device):
    # Several value tiles where M exceeds a pass's block: the shares of dq, dg, dk and dc added in tile order (the
    # queries pass and the keys pass cut M differently). float32 D = 128: the chain's loads in one stage.
    if dtype == torch.float32 and D > 128:
        pytest.skip("float32 inputs take the fused kernels up to D = 128")
    q, k, v = inputs(gen, 1, 1, 130, D, M, dtype, device)
    check_gradients(q, k, v, gen, clamp=5.0)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_fused_causal_gradients_with_padding(gen, padding, dtype, device):
    B, H, L, D, M = 3, 2, 140, 16, 16
    q, k, v = inputs(gen, B, H, L, D, M, dtype, device)
    qpad, kpad = padding_masks(gen, padding, B, L, L)
    v[:, :, 3] = float("nan")  # a padded position's value counts for nothing, whatever it holds
    kpad[:, 3] = True
    dq, dk, dv = check_gradients(q, k, v, gen, query_padding_mask=qpad.to(device), key_padding_mask=kpad.to(device))
    pad = (qpad | kpad).to(device)[:, None, :].expand(B, H, L)
    assert all((g[pad] == 0).all() for g in (dq, dk, dv))  # padded positions: no gradient


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "misaligned"])
def test_fused_causal_gradients_strided_inputs(gen, layout, dtype, device):
    B, L, H, D = 1, 100, 2, 32
    if layout == "transposed":
        q, k, v = (randn(gen, B, L, H, D, dtype=dtype, device=device).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (randn(gen, B, H, L, D + 1, dtype=dtype, device=device)[..., 1:] for _ in range(3))
    check_gradients(q, k, v, gen, feature_map="elu1")


def state_gradients(q, k, v, state, grad_out, grad_state, rounded_to=None, feature_map="sigmoid", **options):
    """The gradients of <out, grad_out> + <final state, grad_state> for q, k, v and the incoming state (rounded_to:
    the op on rounded_features of that dtype)."""
    def op(q, k, v, state):
        if rounded_to is None:
            return F.causal_flow_attention(q, k, v, state=state, feature_map=feature_map, **options)
        q, k = (rounded_features(x, feature_map, rounded_to) for x in (q, k))
        return F.causal_flow_attention(q, k, v, state=state, feature_map="identity", **options)
    return grads_of(op, (q, k, v, state), [grad_out, grad_state])[1]


def check_state_gradients(q, k, v, state, grad_out, grad_state, **options):
    """state_gradients of the op against those of the op in float64 on the rounded features (the portable
    algorithm; the exact features on the CPU backend), to the gradients' tolerance; returns the op's."""
    got = state_gradients(q, k, v, state, grad_out, grad_state, **options)
    cpu = {name: (x.cpu() if torch.is_tensor(x) else x) for name, x in options.items()}
    expected = state_gradients(*(t.double().cpu() for t in (q, k, v, state, grad_out, grad_state)),
                               rounded_to=q.dtype if fused(q.device.type) else torch.float64, **cpu)
    for name, a, b in zip(("query", "key", "value", "state"), got, expected):
        assert_close(a, b, grad_tol(q.dtype), f"grad {name}")
    return got


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("feature_map,clamp", [("elu1", float("inf")), ("sigmoid", 1.0)])
def test_fused_causal_gradients_of_the_states(gen, feature_map, clamp, dtype, device):
    # From an incoming state (30 rows' worth), the final state in the loss: the gradients of q, k, v and of the
    # incoming state against the op in float64 (the portable algorithm) on the rounded features; n's gradient is 0.
    B, H, L, D, M = 2, 2, 140, 16, 32
    q, k, v = inputs(gen, B, H, L, D, M, dtype, device, feature_map)
    pad = (torch.rand(B, L, generator=gen) < 0.1).to(device)
    options = dict(clamp=clamp, feature_map=feature_map, key_padding_mask=pad)
    prefix = [features_input(gen, (B, H, 30, n), feature_map, dtype, device) for n in (D, D)]
    _, state0 = F.causal_flow_attention(*prefix, randn(gen, B, H, 30, M, dtype=dtype, device=device),
                                        feature_map=feature_map)
    grad_out = randn(gen, B, H, L, M, dtype=dtype, device=device)
    grad_state = randn(gen, *state0.shape, device=device) * 1e-2
    got = check_state_gradients(q, k, v, state0, grad_out, grad_state, **options)
    assert got[3].dtype == torch.float32 and (got[3][..., 0] == 0).all()


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_fused_causal_gradients_split_schedule(gen, dtype, device, monkeypatch):
    # Few (batch, head)s and a long sequence: every pass runs 1100 rows as 5 segments of 256 (the emulated build
    # counts an H200's 132 multiprocessors), the queries pass from each segment's incoming state, the keys pass from
    # each segment's R after it, the chain from each segment's carries after it (P, RA, RB, RK, RQ). A whole segment
    # padded, the competition's winners late, an incoming state and the final state in the loss: every gradient
    # against the op in float64 on the rounded features. Outputs poisoned first (every element written); two runs
    # bitwise equal.
    monkeypatch.setenv("FLOWFORMER_POISON_OUTPUTS", "1")
    B, H, L, D, M = 1, 2, 1100, 16, 32
    q, k, v = inputs(gen, B, H, L, D, M, dtype, device, "elu1")
    k = k.clone()
    k[:, :, 900:] += 2.0
    pad = torch.rand(B, L, generator=gen) < 0.1
    pad[:, 256:600] = True
    pad = pad.to(device)
    options = dict(clamp=float("inf"), feature_map="elu1", key_padding_mask=pad)
    prefix = [features_input(gen, (B, H, 30, n), "elu1", dtype, device) for n in (D, D)]
    _, state0 = F.causal_flow_attention(*prefix, randn(gen, B, H, 30, M, dtype=dtype, device=device),
                                        feature_map="elu1")
    grad_out = randn(gen, B, H, L, M, dtype=dtype, device=device)
    grad_state = randn(gen, *state0.shape, device=device) * 1e-2
    got = check_state_gradients(q, k, v, state0, grad_out, grad_state, **options)
    padded = pad[:, None, :].expand(B, H, L)
    assert all((t[padded] == 0).all() for t in got[:3])  # padded rows: no gradient
    again = state_gradients(q, k, v, state0, grad_out, grad_state, **options)
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # deterministic: fixed order throughout


@pytest.mark.parametrize("device", devices(OP))
def test_fused_causal_backward_ops_do_not_grow_with_segments(gen, device, monkeypatch):
    # The split passes' launches and host ops are the same for 3 segments as for 6.
    if device == "cpu":
        monkeypatch.setenv("FLOWFORMER_EMULATE_CUDA", "1")  # the fused kernels' emulated build

    def ops_of(L):
        q, k, v, grad_out = (randn(gen, 1, 1, L, 16, dtype=torch.bfloat16, device=device) for _ in range(4))
        return ops_made(lambda: torch.ops.flowformer.causal_flow_attention_backward(
            grad_out, None, q, k, v, feature_map="sigmoid", eps=1e-6, clamp=1.0, state=None, query_padding_mask=None,
            key_padding_mask=None, cu_seqlens=None))

    split = ops_of(600)
    assert split == ops_of(1500)
    assert split != ops_of(100)  # whole sequences take fewer: the split schedule ran


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_fused_causal_gradients_through_pieces_equal_one_run(gen, dtype, device):
    # Pieces of 70, 64, 0 and 6 rows carrying the state: each piece's backward from the next one's state gradient
    # equals one run's.
    B, H, L, D, M = 2, 2, 140, 16, 32
    q, k, v = inputs(gen, B, H, L, D, M, dtype, device, "elu1")
    grad_out = randn(gen, B, H, L, M, dtype=dtype, device=device)
    options = dict(clamp=float("inf"), feature_map="elu1")

    def run(cuts):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        state, outs, start = None, [], 0
        for end in (*cuts, L):
            out, state = F.causal_flow_attention(*(t[:, :, start:end] for t in leaves), state=state, **options)
            outs.append(out)
            start = end
        return torch.autograd.grad((torch.cat(outs, 2).float() * grad_out.float()).sum(), leaves)

    for name, a, b in zip(("query", "key", "value"), run((70, 134, 134)), run(())):
        assert_close(a, b, grad_tol(dtype), f"grad {name}")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("lengths", [(70, 0, 130, 1), (600, 0, 1030, 5)])
def test_fused_causal_gradients_of_packed_sequences_equal_each_alone(gen, lengths, dtype, device):
    # Packed sequences (one empty, one of a single row, two that start inside a chunk) from their own incoming
    # states, the final states in the loss: bitwise the gradients of each sequence alone as whole sequences; long
    # enough for the split passes (segments of 256 rows, one sequence shorter than a segment) to the gradients'
    # tolerance (a sequence's sums are added in other orders when the plans differ).
    H, D, M = 2, 16, 32
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    total = sum(lengths)
    q, k, v = inputs(gen, 1, H, total, D, M, dtype, device, "relu")
    pad = (torch.rand(1, total, generator=gen) < 0.2).to(device)
    prefix = [randn(gen, 1, H, 20, n, dtype=dtype, device=device) for n in (D, D, M)]
    states = torch.cat([F.causal_flow_attention(*prefix, feature_map="relu")[1] for _ in lengths])
    grad_out = randn(gen, 1, H, total, M, dtype=dtype, device=device)
    grad_states = randn(gen, *states.shape, device=device) * 1e-2
    packed = grads_of(lambda *x: F.causal_flow_attention(*x[:3], state=x[3], cu_seqlens=cu, query_padding_mask=pad,
                                                         feature_map="relu"),
                      (q, k, v, states), [grad_out, grad_states])[1]
    for n, (first, last) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        piece = (q[:, :, first:last], k[:, :, first:last], v[:, :, first:last], states[n:n + 1])
        alone = grads_of(lambda *x: F.causal_flow_attention(*x[:3], state=x[3], query_padding_mask=pad[:, first:last],
                                                            feature_map="relu"),
                         piece, [grad_out[:, :, first:last], grad_states[n:n + 1]])[1]
        for name, a, b in zip(("query", "key", "value", "state"), packed, alone):
            a = a[n:n + 1] if name == "state" else a[:, :, first:last]
            if max(lengths) < 512:
                assert torch.equal(a, b), f"grad {name} of sequence {n}"
            else:
                assert_close(a, b, grad_tol(dtype), f"grad {name} of sequence {n}")


@pytest.mark.parametrize("device", devices(OP))
def test_fused_causal_backward_ops_do_not_grow_with_sequences(gen, device, monkeypatch):
    # All packed sequences in three launches: a backward makes as many ops for 2 sequences as for 9.
    if device == "cpu":
        monkeypatch.setenv("FLOWFORMER_EMULATE_CUDA", "1")  # the fused kernels' emulated build

    def ops_of(sequences):
        cu = torch.arange(sequences + 1, device=device) * 10
        q, k, v = (randn(gen, 1, 1, 10 * sequences, 16, dtype=torch.bfloat16, device=device) for _ in range(3))
        grad_out = randn(gen, 1, 1, 10 * sequences, 16, dtype=torch.bfloat16, device=device)
        return ops_made(lambda: torch.ops.flowformer.causal_flow_attention_backward(
            grad_out, None, q, k, v, feature_map="sigmoid", eps=1e-6, clamp=1.0, state=None, query_padding_mask=None,
            key_padding_mask=None, cu_seqlens=cu))

    assert ops_of(2) == ops_of(9)


@pytest.mark.parametrize("device", devices(OP))
def test_fused_causal_backward_takes_float32_at_head_dim_128(gen, device, monkeypatch):
    # float32 D = 128 on the fused passes (the chain's loads in one stage), not the portable item kernels: no op
    # that the fused passes at D = 64 do not make (the portable chain's scans and elementwise ops would show).
    if device == "cpu":
        monkeypatch.setenv("FLOWFORMER_EMULATE_CUDA", "1")  # the fused kernels' emulated build

    def ops_of(D, dtype=torch.float32):
        q, k = (randn(gen, 1, 1, 70, D, dtype=dtype, device=device) for _ in range(2))
        v, grad_out = (randn(gen, 1, 1, 70, 128, dtype=dtype, device=device) for _ in range(2))
        return set(ops_made(lambda: torch.ops.flowformer.flow_attention_backward(
            grad_out, q, k, v, feature_map="sigmoid", eps=1e-6, clamp=1.0, causal=True, query_padding_mask=None,
            key_padding_mask=None)))

    fused = ops_of(64)
    assert not ops_of(64, torch.float64) <= fused  # the portable path's ops would show
    assert ops_of(128) <= fused


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_causal_gradients_write_every_element(gen, dtype, device, monkeypatch):
    # Gradients poisoned with NaN before the kernels run: padded rows, two value tiles (shares), the last partial
    # chunk, an element wholly padded: every element written.
    monkeypatch.setenv("FLOWFORMER_POISON_OUTPUTS", "1")
    B, H, L, D, M = 3, 2, 100, 16, 128
    q, k, v = inputs(gen, B, H, L, D, M, dtype, device)
    pad = torch.rand(B, L, generator=gen) < 0.2
    pad[2] = True
    pad = pad.to(device)
    _, state0 = F.causal_flow_attention(*(t[:, :, :10] for t in (q, k, v)))
    grad_out = randn(gen, B, H, L, M, dtype=dtype, device=device)
    g = state_gradients(q, k, v, state0, grad_out, torch.ones_like(state0), key_padding_mask=pad)
    assert all(not torch.isnan(t).any() for t in g)
    assert all((t[2] == 0).all() for t in g[:3])  # element 2 wholly padded: no gradient to its rows


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_fused_causal_gradients_are_deterministic(gen, dtype, device):
    q, k, v = inputs(gen, 2, 2, 130, 64, 64, dtype, device)
    grad_out = randn(gen, 2, 2, 130, 64, dtype=dtype, device=device)
    runs = [grads(lambda *x: F.flow_attention(*x, causal=True), (q, k, v), grad_out)[1] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("feature_map", ["sigmoid", "elu1"])
@pytest.mark.parametrize("L", [1, 70])
def test_fused_causal_gradients_of_extreme_inputs_stay_finite(gen, L, feature_map, dtype, device):
    # Logits of magnitude 50, no clamp.
    q, k, v = inputs(gen, 1, 2, L, 16, 16, dtype, device, scale=50.0)
    grad_out = randn(gen, 1, 2, L, 16, dtype=dtype, device=device)
    _, g = grads(lambda *x: F.flow_attention(*x, causal=True, feature_map=feature_map, clamp=float("inf")),
                 (q, k, v), grad_out)
    assert all(torch.isfinite(t).all() for t in g)


@pytest.mark.parametrize("device", devices(OP))
def test_fused_causal_backward_opcheck(gen, device):
    # The backward op at a fused shape (bf16, D = M = 16, packed sequences from states): its Meta kernel, schema
    # and dispatch agree with the fused path's outputs.
    q, k, v = inputs(gen, 1, 2, 150, 16, 16, torch.bfloat16, device)
    cu = torch.tensor([0, 70, 70, 150], device=device)
    _, states = F.causal_flow_attention(*(randn(gen, 3, 2, 20, 16, dtype=torch.bfloat16, device=device)
                                          for _ in range(3)))
    grad_out = randn(gen, 1, 2, 150, 16, dtype=torch.bfloat16, device=device)
    options = {"feature_map": "sigmoid", "eps": 1e-6, "clamp": 1.0, "state": states, "query_padding_mask": None,
               "key_padding_mask": None, "cu_seqlens": cu}
    torch.library.opcheck(torch.ops.flowformer.causal_flow_attention_backward.default,
                          (grad_out, torch.ones_like(states), q, k, v), options)
