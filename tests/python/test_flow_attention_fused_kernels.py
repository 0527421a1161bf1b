"""Causal flow_attention and causal_flow_attention at the head dims of the fused CUDA kernel
(kernels/flow_attention/causal_forward.cuh, run in the SIMT emulator by `make test-emulated`; bf16 and half, and
float32 as three tf32 products): parity with the float64 reference across several chunks, feature maps, clamps,
masks and value tiles; strided inputs; the state's continuation and token-by-token decoding; determinism;
extreme inputs."""

import pytest
import torch

from flowformer import functional as F
from flowformer import reference as R
from helpers import FORWARD_TOL, PADDINGS, assert_close, devices, features_input, ops_made, padding_masks, randn

OP = "flowformer::causal_flow_attention"
FUSED_DTYPES = [torch.bfloat16, torch.float16, torch.float32]  # float32: three tf32 products, D <= 128


def reference(q, k, v, **options):
    return R.flow_attention(*(t.double().cpu() for t in (q, k, v)), causal=True,
                            **{name: (x.cpu() if torch.is_tensor(x) else x) for name, x in options.items()})


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("feature_map", ["sigmoid", "elu1", "relu", "identity"])
@pytest.mark.parametrize("clamp", [1.0, 0.05, float("inf")])
def test_fused_causal_flow_attention_matches_the_reference(gen, feature_map, clamp, dtype, device):
    # 150 rows: two whole chunks and a partial one; D = 16, M = 32: one value tile.
    B, H, L, D, M = 1, 2, 150, 16, 32
    q, k = (features_input(gen, (B, H, L, D), feature_map, dtype, device) for _ in range(2))
    v = randn(gen, B, H, L, M, dtype=dtype, device=device)
    out = F.flow_attention(q, k, v, causal=True, feature_map=feature_map, clamp=clamp)
    assert out.dtype == dtype
    assert_close(out, reference(q, k, v, feature_map=feature_map, clamp=clamp), FORWARD_TOL[dtype], "out")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("eps", [0.5, 5.0])
def test_fused_causal_flow_attention_eps_terms(gen, eps, dtype, device):
    # A large eps makes each eps term of the normalisers count (at 1e-6 they are below the tolerances); a state
    # carried in makes those of the state's vectors count as well.
    B, H, L, D, M = 2, 2, 150, 16, 16
    q, k = (randn(gen, B, H, L, D, dtype=dtype, device=device) for _ in range(2))
    v = randn(gen, B, H, L, M, dtype=dtype, device=device)
    options = dict(eps=eps, clamp=float("inf"), feature_map="elu1")
    _, state = F.causal_flow_attention(q[:, :, :70], k[:, :, :70], v[:, :, :70], **options)
    out, _ = F.causal_flow_attention(q[:, :, 70:], k[:, :, 70:], v[:, :, 70:], state=state, **options)
    assert_close(out, reference(q, k, v, **options)[:, :, 70:], FORWARD_TOL[dtype], "out")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("D,M", [(64, 64), (128, 64), (256, 32), (32, 256)])
def test_fused_causal_flow_attention_head_dims_and_value_tiles(gen, D, M, dtype, device):
    # Several value tiles where M exceeds the block's (each block recomputes the rows' flows).
    if dtype == torch.float32 and D > 128:
        pytest.skip("float32 inputs take the fused kernel up to D = 128")
    B, H, L = 1, 1, 130
    q, k = (randn(gen, B, H, L, D, dtype=dtype, device=device) for _ in range(2))
    v = randn(gen, B, H, L, M, dtype=dtype, device=device)
    out, state = F.causal_flow_attention(q, k, v)
    assert_close(out, reference(q, k, v), FORWARD_TOL[dtype], "out")
    _, expected_state = F.causal_flow_attention(*(t.double().cpu() for t in (q, k, v)))
    assert_close(state, expected_state, FORWARD_TOL[dtype], "state")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_fused_causal_flow_attention_with_padding(gen, padding, dtype, device):
    B, H, L, D, M = 3, 2, 140, 16, 16
    q, k = (randn(gen, B, H, L, D, dtype=dtype, device=device) for _ in range(2))
    v = randn(gen, B, H, L, M, dtype=dtype, device=device)
    qpad, kpad = padding_masks(gen, padding, B, L, L)
    v[:, :, 3] = float("nan")  # a padded position's value counts for nothing, whatever it holds
    qpad[:, 3] = True
    options = dict(query_padding_mask=qpad.to(device), key_padding_mask=kpad.to(device))
    out = F.flow_attention(q, k, v, causal=True, **options)
    expected = reference(q, k, v.nan_to_num(), **options)
    assert_close(out, expected, FORWARD_TOL[dtype], "out")
    assert (out[(qpad | kpad).to(device)[:, None, :].expand(B, H, L)] == 0).all()  # padded rows: 0


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "misaligned"])
def test_fused_causal_flow_attention_strided_inputs(gen, layout, dtype, device):
    B, L, H, D = 1, 100, 2, 32
    if layout == "transposed":  # (B, L, H, D) projections viewed as (B, H, L, D): read in place
        q, k, v = (randn(gen, B, L, H, D, dtype=dtype, device=device).transpose(1, 2) for _ in range(3))
    else:  # rows one element past 16 bytes: copied first
        q, k, v = (randn(gen, B, H, L, D + 1, dtype=dtype, device=device)[..., 1:] for _ in range(3))
    out = F.flow_attention(q, k, v, causal=True, feature_map="elu1")
    assert_close(out, reference(q, k, v, feature_map="elu1"), FORWARD_TOL[dtype], "out")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_fused_causal_flow_attention_continues_from_states(gen, dtype, device):
    # Pieces of 70, 64 and 1 rows carrying the state, then 5 decoded tokens, equal one run; padding included.
    B, H, L, D, M = 2, 2, 140, 16, 32
    q, k = (randn(gen, B, H, L, D, dtype=dtype, device=device) for _ in range(2))
    v = randn(gen, B, H, L, M, dtype=dtype, device=device)
    pad = torch.rand(B, L, generator=gen) < 0.1
    pad = pad.to(device)
    options = dict(clamp=float("inf"), feature_map="elu1")
    whole, whole_state = F.causal_flow_attention(q, k, v, key_padding_mask=pad, **options)
    outs, state, start = [], None, 0
    for end in (70, 134, 135, *range(136, L + 1)):
        out, state = F.causal_flow_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], state=state,
                                             key_padding_mask=pad[:, start:end], **options)
        outs.append(out)
        start = end
    assert_close(torch.cat(outs, 2), whole, FORWARD_TOL[dtype], "out")
    assert_close(state, whole_state, FORWARD_TOL[dtype], "state")
    assert (state[:, :, 0] == (~pad).sum(1, keepdim=True).float()).all()  # n counts the valid positions
    assert_close(whole, reference(q, k, v, key_padding_mask=pad, **options), FORWARD_TOL[dtype], "out")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_fused_causal_flow_attention_is_deterministic(gen, dtype, device):
    q, k, v = (randn(gen, 2, 2, 130, 64, dtype=dtype, device=device) for _ in range(3))
    first = F.causal_flow_attention(q, k, v)
    second = F.causal_flow_attention(q, k, v)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("feature_map", ["sigmoid", "elu1"])
@pytest.mark.parametrize("L", [1, 70])
def test_fused_causal_flow_attention_extreme_inputs_stay_finite(gen, L, feature_map, dtype, device):
    # Logits of magnitude 50 (sigmoid features of 2e-22 next to 1; elu1 features of 51), no clamp.
    q, k = (randn(gen, 1, 2, L, 16, dtype=dtype, device=device, scale=50.0) for _ in range(2))
    v = randn(gen, 1, 2, L, 16, dtype=dtype, device=device)
    out, state = F.causal_flow_attention(q, k, v, feature_map=feature_map, clamp=float("inf"))
    assert torch.isfinite(out).all() and torch.isfinite(state).all()


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("lengths", [(70, 0, 130, 1), (600, 0, 1030, 5)])
def test_fused_packed_sequences_equal_each_alone(gen, lengths, dtype, device):
    # Packed sequences (one empty) from their own incoming states equal each sequence run alone: bitwise as whole
    # sequences; long enough for the split schedule (segments of 256 rows, one sequence shorter than a segment)
    # to the inputs' tolerance (a sequence's sums are added in other orders when the plans differ).
    H, D, M = 2, 16, 32
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    total = sum(lengths)
    q, k = (randn(gen, 1, H, total, D, dtype=dtype, device=device) for _ in range(2))
    v = randn(gen, 1, H, total, M, dtype=dtype, device=device)
    pad = (torch.rand(1, total, generator=gen) < 0.2).to(device)
    prefix = [randn(gen, 1, H, 20, n, dtype=dtype, device=device) for n in (D, D, M)]
    states = torch.cat([F.causal_flow_attention(*prefix, feature_map="relu")[1] for _ in lengths])
    out, state = F.causal_flow_attention(q, k, v, state=states, cu_seqlens=cu, query_padding_mask=pad,
                                         feature_map="relu")
    whole = max(lengths) < 512

    def check(actual, expected, what):
        if whole:
            assert torch.equal(actual, expected), what
        else:
            assert_close(actual, expected, FORWARD_TOL[dtype], what)

    for n, (first, last) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone, alone_state = F.causal_flow_attention(q[:, :, first:last], k[:, :, first:last], v[:, :, first:last],
                                                     state=states[n:n + 1], query_padding_mask=pad[:, first:last],
                                                     feature_map="relu")
        check(out[:, :, first:last], alone, f"out of sequence {n}")
        check(state[n:n + 1], alone_state, f"state of sequence {n}")


@pytest.mark.parametrize("device", devices(OP))
def test_fused_packed_sequences_ops_do_not_grow_with_sequences(gen, device, monkeypatch):
    # All packed sequences in one launch: a call makes as many ops for 2 sequences as for 9.
    if device == "cpu":
        monkeypatch.setenv("FLOWFORMER_EMULATE_CUDA", "1")  # the fused kernels' emulated build

    def ops_of(sequences):
        cu = torch.arange(sequences + 1, device=device) * 10
        q, k, v = (randn(gen, 1, 1, 10 * sequences, 16, dtype=torch.bfloat16, device=device) for _ in range(3))
        return ops_made(lambda: F.causal_flow_attention(q, k, v, cu_seqlens=cu))

    assert ops_of(2) == ops_of(9)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_fused_causal_flow_attention_split_schedule(gen, dtype, device, monkeypatch):
    # Few (batch, head)s and a long sequence: 1100 rows run as 5 segments of 256 (the emulated build counts an
    # H200's 132 multiprocessors), each from the state the earlier ones leave: a whole segment padded, the
    # competition's winners late (the earlier segments' sums against a later maximum), an incoming state; the
    # state after equals the state of a run in pieces short enough for whole sequences. Outputs poisoned first.
    monkeypatch.setenv("FLOWFORMER_POISON_OUTPUTS", "1")
    B, H, L, D, M = 1, 2, 1100, 16, 32
    q, k = (randn(gen, B, H, L, D, dtype=dtype, device=device) for _ in range(2))
    v = randn(gen, B, H, L, M, dtype=dtype, device=device)
    k[:, :, 900:] += 2.0
    pad = torch.rand(B, L, generator=gen) < 0.1
    pad[:, 256:600] = True
    pad = pad.to(device)
    options = dict(clamp=float("inf"), feature_map="elu1")
    prefix = [randn(gen, B, H, 30, n, dtype=dtype, device=device) for n in (D, D, M)]
    _, state0 = F.causal_flow_attention(*prefix, **options)
    out, state = F.causal_flow_attention(q, k, v, state=state0, key_padding_mask=pad, **options)
    assert not torch.isnan(out).any()
    expected = reference(torch.cat([prefix[0], q], 2), torch.cat([prefix[1], k], 2), torch.cat([prefix[2], v], 2),
                         key_padding_mask=torch.cat([torch.zeros(B, 30, dtype=torch.bool, device=device), pad], 1),
                         **options)[:, :, 30:]
    assert_close(out, expected, FORWARD_TOL[dtype], "out")
    assert (out[pad[:, None, :].expand(B, H, L)] == 0).all()  # padded rows: 0
    pieces, start = state0, 0
    for end in (400, 800, L):  # pieces of at most 400 rows: whole sequences
        _, pieces = F.causal_flow_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], state=pieces,
                                            key_padding_mask=pad[:, start:end], **options)
        start = end
    assert_close(state, pieces, FORWARD_TOL[dtype], "state")
    assert (state[:, :, 0] == 30 + (~pad).sum(1, keepdim=True).float()).all()  # n counts the valid positions
    again = F.causal_flow_attention(q, k, v, state=state0, key_padding_mask=pad, **options)
    assert torch.equal(out, again[0]) and torch.equal(state, again[1])  # deterministic: fixed order throughout


@pytest.mark.parametrize("device", devices(OP))
def test_fused_causal_flow_attention_ops_do_not_grow_with_segments(gen, device, monkeypatch):
    # The split schedule's launches and host ops are the same for 3 segments as for 6.
    if device == "cpu":
        monkeypatch.setenv("FLOWFORMER_EMULATE_CUDA", "1")  # the fused kernels' emulated build

    def ops_of(L):
        q, k, v = (randn(gen, 1, 1, L, 16, dtype=torch.bfloat16, device=device) for _ in range(3))
        return ops_made(lambda: F.causal_flow_attention(q, k, v))

    split = ops_of(600)
    assert split == ops_of(1500)
    assert split != ops_of(100)  # whole sequences take fewer: the split schedule ran
