"""causal_linear_attention and linear_attention at the head dims of the fused CUDA kernels (kernels/linear_attention,
run in the SIMT emulator by `make test-emulated`; bf16 and half, and float32 as three tf32 products): strided
and misaligned inputs, continuation of pieces with states, determinism, the split schedules. Parity with the
float64 reference at these shapes is in test_linear_attention_parity.py and test_linear_attention_packed.py."""

import pytest
import torch

from flowformer import functional as F
from flowformer import reference as R
from helpers import FORWARD_TOL, assert_close, devices, grad_tol, randn

OP = "flowformer::causal_linear_attention"
NONCAUSAL = "flowformer::linear_attention"
HALF_DTYPES = [torch.bfloat16, torch.float16]
FUSED_DTYPES = [*HALF_DTYPES, torch.float32]  # float32: three tf32 products, D <= 128


def gradients(q, k, v, grad_out, **options):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, kv, z = F.causal_linear_attention(*leaves, **options)
    return (out, kv, z), torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "misaligned"])
def test_fused_linear_attention_strided_inputs(gen, layout, dtype, device):
    # (B, L, H, D) projections viewed as (B, H, L, D): rows strided by H * D (read in place); or rows that
    # start one element past 16 bytes (copied first).
    B, L, H, D = 2, 100, 2, 32
    if layout == "transposed":
        q, k, v = (randn(gen, B, L, H, D, dtype=dtype, device=device).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (randn(gen, B, H, L, D + 1, dtype=dtype, device=device)[..., 1:] for _ in range(3))
    grad_out = randn(gen, B, H, L, D, dtype=dtype, device=device)
    (out, kv, z), grads = gradients(q, k, v, grad_out)
    (ref, ref_kv, ref_z), ref_grads = gradients(*(t.double().cpu() for t in (q, k, v)), grad_out.double().cpu())
    assert_close(out, ref, FORWARD_TOL[dtype], "out")
    assert_close(kv, ref_kv, FORWARD_TOL[dtype], "final_kv")
    for name, a, b in zip(("query", "key", "value"), grads, ref_grads):
        assert_close(a, b, grad_tol(dtype), f"grad {name}")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_fused_linear_attention_continuation(gen, dtype, device):
    # Pieces of 70, 64 and 1 rows carrying the state equal one run, forward and gradients (within the
    # dtype's tolerance: the chunks fall at other rows).
    B, H, L, D, M = 1, 2, 150, 16, 32
    q, k = (randn(gen, B, H, L, D, dtype=dtype, device=device) for _ in range(2))
    v = randn(gen, B, H, L, M, dtype=dtype, device=device)
    grad_out = randn(gen, B, H, L, M, dtype=dtype, device=device)

    def run(cuts):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        outs, kv, z, start = [], None, None, 0
        for end in (*cuts, L):
            out, kv, z = F.causal_linear_attention(*(t[:, :, start:end] for t in leaves), initial_kv=kv,
                                                   initial_z=z)
            outs.append(out)
            start = end
        out = torch.cat(outs, 2)
        return (out, kv, z), torch.autograd.grad((out * grad_out).sum() + kv.sum() + z.sum(), leaves)

    whole, whole_grads = run(())
    pieces, piece_grads = run((70, 134, 135))
    for name, a, b in zip(("out", "final_kv", "final_z"), pieces, whole):
        assert_close(a, b, FORWARD_TOL[dtype], name)
    for name, a, b in zip(("query", "key", "value"), piece_grads, whole_grads):
        assert_close(a, b, grad_tol(dtype), f"grad {name}")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("shape", [(2, 2, 130), (1, 1, 600)])  # (1, 1, 600): the split schedule
def test_fused_linear_attention_is_deterministic(gen, shape, dtype, device):
    # No atomics, fixed summation orders: two runs give the same bits, forward and backward.
    q, k, v, grad_out = (randn(gen, *shape, 64, dtype=dtype, device=device) for _ in range(4))
    first, first_grads = gradients(q, k, v, grad_out)
    second, second_grads = gradients(q, k, v, grad_out)
    for a, b in zip((*first, *first_grads), (*second, *second_grads)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", devices(OP))
def test_fused_linear_attention_half_state_beyond_half_range(gen, device):
    # sum_j phi(k_j) v_j reaches about 10^6: the kernels keep the state in float32 and scale its half parts.
    B, H, L, D = 1, 1, 300, 16
    q, k = (randn(gen, B, H, L, D, dtype=torch.float16, device=device).abs() + 1 for _ in range(2))
    v = randn(gen, B, H, L, D, dtype=torch.float16, device=device) * 100 + 2000
    out, kv, z = F.causal_linear_attention(q, k, v, feature_map="identity")
    ref_out, ref_kv, ref_z = R.causal_linear_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                                       feature_map="identity")
    assert ref_kv.abs().max() > 65504 * 4
    assert_close(out, ref_out, FORWARD_TOL[torch.float16], "out")
    assert_close(kv, ref_kv, FORWARD_TOL[torch.float16], "final_kv")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lengths", [None, (600, 0, 300, 5)])
def test_fused_linear_attention_split_schedule(gen, lengths, normalize, dtype, device):
    # Few long sequences (here 1 or 4 blocks for the 132 multiprocessors of an H200, which the emulated build
    # assumes too): each sequence runs as segments of 256 rows from the states a scan over the segments
    # gives them (kernels/linear_attention/fused_kernels.h, plan_segments). Against float64, states in and out.
    H, D, M = 1, 16, 16
    L = 600 if lengths is None else sum(lengths)
    N = 1 if lengths is None else len(lengths)
    q, k = (randn(gen, 1, H, L, D, dtype=dtype, device=device) for _ in range(2))
    v = randn(gen, 1, H, L, M, dtype=dtype, device=device)
    kv0 = randn(gen, N, H, D, M, device=device)
    z0 = (torch.rand(N, H, D, generator=gen) + 1).to(device)
    grad_out = randn(gen, 1, H, L, M, dtype=dtype, device=device)
    cu = None if lengths is None else torch.tensor([0, 600, 600, 900, 905], device=device)

    def run(q_, k_, v_, kv_, z_, fn, cu_):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q_, k_, v_, kv_, z_)]
        out, kv, z = fn(*leaves[:3], initial_kv=leaves[3], initial_z=leaves[4], normalize=normalize,
                        **({} if cu_ is None else dict(cu_seqlens=cu_)))
        loss = (out * grad_out.to(out.dtype).to(out.device)).sum() + kv.sum() + z.sum()
        return (out, kv, z), torch.autograd.grad(loss, leaves)

    results, grads = run(q, k, v, kv0, z0, F.causal_linear_attention, cu)
    if lengths is None:
        expected, expected_grads = run(*(t.double().cpu() for t in (q, k, v, kv0, z0)), R.causal_linear_attention,
                                       None)
    else:  # the reference takes one sequence a call
        expected = [[], [], []]
        expected_grads = [[] for _ in range(5)]
        starts = [0, 600, 600, 900, 905]
        for n in range(N):
            rows = slice(starts[n], starts[n + 1])
            sequence = [t.double().cpu() for t in (q[:, :, rows], k[:, :, rows], v[:, :, rows], kv0[n:n + 1],
                                                     z0[n:n + 1])]
            leaves = [t.requires_grad_(True) for t in sequence]
            out, kv, z = R.causal_linear_attention(*leaves[:3], initial_kv=leaves[3], initial_z=leaves[4],
                                                   normalize=normalize)
            loss = (out * grad_out[:, :, rows].double().cpu()).sum() + kv.sum() + z.sum()
            for i, g in enumerate(torch.autograd.grad(loss, leaves)):
                expected_grads[i].append(g)
            for i, r in enumerate((out, kv, z)):
                expected[i].append(r.detach())
        expected = [torch.cat(expected[0], 2), torch.cat(expected[1]), torch.cat(expected[2])]
        expected_grads = [torch.cat(g, 2 if i < 3 else 0) for i, g in enumerate(expected_grads)]
    for name, a, b in zip(("out", "final_kv", "final_z"), results, expected):
        assert_close(a, b, FORWARD_TOL[dtype], name)
    for name, a, b in zip(("query", "key", "value", "initial_kv", "initial_z"), grads, expected_grads):
        assert_close(a, b, grad_tol(dtype), f"grad {name}")


def noncausal_case(gen, B, H, L, S, D, M, dtype, device, padded_batch=None):
    q = randn(gen, B, H, L, D, dtype=dtype, device=device)
    k = randn(gen, B, H, S, D, dtype=dtype, device=device)
    v = randn(gen, B, H, S, M, dtype=dtype, device=device)
    mask = torch.rand(B, S, generator=gen) < 0.3
    mask[:, :2] = False  # one valid key alone gives out = v: O(eps) query and key gradients, all rounding
    if padded_batch is not None:
        mask[padded_batch] = True  # every key padded: out = 0 / (0 + eps) = 0, no gradient
    grad_out = randn(gen, B, H, L, M, dtype=dtype, device=device)
    return q, k, v, mask.to(device), grad_out


def noncausal_gradients(q, k, v, mask, grad_out, fn=F.linear_attention):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, key_padding_mask=mask)
    return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


def assert_noncausal_close(q, k, v, mask, grad_out, dtype):
    # Against float64, forward and gradients; padded keys get no gradient.
    out, grads = noncausal_gradients(q, k, v, mask, grad_out)
    ref, ref_grads = noncausal_gradients(*(t.double().cpu() for t in (q, k, v)), mask.cpu(), grad_out.double().cpu(),
                                         R.linear_attention)
    assert_close(out, ref, FORWARD_TOL[dtype], "out")
    for name, a, b in zip(("query", "key", "value"), grads, ref_grads):
        assert_close(a, b, grad_tol(dtype), f"grad {name}")
    for grad in grads[1:]:
        assert (grad.masked_select(mask[:, None, :, None]) == 0).all()
    return out


@pytest.mark.parametrize("device", devices(NONCAUSAL))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "misaligned"])
def test_fused_noncausal_strided_inputs(gen, layout, dtype, device):
    # Queries and keys of other lengths, padded keys, rows strided in place or copied (as the causal test).
    B, L, S, H, D = 2, 90, 140, 2, 32
    if layout == "transposed":
        q = randn(gen, B, L, H, D, dtype=dtype, device=device).transpose(1, 2)
        k, v = (randn(gen, B, S, H, D, dtype=dtype, device=device).transpose(1, 2) for _ in range(2))
        grad_out = randn(gen, B, L, H, D, dtype=dtype, device=device).transpose(1, 2)
    else:
        q = randn(gen, B, H, L, D + 1, dtype=dtype, device=device)[..., 1:]
        k, v = (randn(gen, B, H, S, D + 1, dtype=dtype, device=device)[..., 1:] for _ in range(2))
        grad_out = randn(gen, B, H, L, D + 1, dtype=dtype, device=device)[..., 1:]
    mask = (torch.rand(B, S, generator=gen) < 0.3).to(device)
    assert_noncausal_close(q, k, v, mask, grad_out, dtype)


@pytest.mark.parametrize("device", devices(NONCAUSAL))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("L,S", [(600, 700), (70, 1200), (1300, 3)])
def test_fused_noncausal_split_schedule(gen, L, S, dtype, device):
    # Few long sequences: the keys' sums and the queries' gradient sums by segments of at least 256 rows, added
    # in segment order, the outputs and gradients by segments too (fused_kernels.h, plan_segments); batch 1
    # has every key padded.
    case = noncausal_case(gen, 2, 1, L, S, 16, 16, dtype, device, padded_batch=1)
    out = assert_noncausal_close(*case, dtype)
    assert (out[1] == 0).all()


@pytest.mark.parametrize("device", devices(NONCAUSAL))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_fused_noncausal_is_deterministic(gen, dtype, device):
    q, k, v, mask, grad_out = noncausal_case(gen, 1, 2, 700, 900, 64, 64, dtype, device)
    first, first_grads = noncausal_gradients(q, k, v, mask, grad_out)
    second, second_grads = noncausal_gradients(q, k, v, mask, grad_out)
    for a, b in zip((first, *first_grads), (second, *second_grads)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("D,M,L", [(128, 64, 130), (32, 256, 600)])  # 4 value tiles; L = 600: the split too
def test_fused_backward_value_tiles(gen, D, M, L, dtype, device):
    # M wider than one value tile: the backward's blocks of each tile write their shares of dq and dk (and of
    # dden_t and dz), which the host adds in tile order. Causal with states in and out, and non-causal.
    q, k = (randn(gen, 1, 1, L, D, dtype=dtype, device=device) for _ in range(2))
    v = randn(gen, 1, 1, L, M, dtype=dtype, device=device)
    kv0 = randn(gen, 1, 1, D, M, device=device)
    z0 = (torch.rand(1, 1, D, generator=gen) + 1).to(device)
    grad_out = randn(gen, 1, 1, L, M, dtype=dtype, device=device)

    def run(fn, *inputs):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        out, kv, z = fn(*leaves[:3], initial_kv=leaves[3], initial_z=leaves[4])
        loss = (out * grad_out.to(out.dtype).to(out.device)).sum() + kv.sum() + z.sum()
        return torch.autograd.grad(loss, leaves)

    grads = run(F.causal_linear_attention, q, k, v, kv0, z0)
    expected = run(R.causal_linear_attention, *(t.double().cpu() for t in (q, k, v, kv0, z0)))
    for name, a, b in zip(("query", "key", "value", "initial_kv", "initial_z"), grads, expected):
        assert_close(a, b, grad_tol(dtype), f"grad {name}")
    assert_noncausal_close(*noncausal_case(gen, 1, 1, L, L - 30, D, M, dtype, device), dtype)


@pytest.mark.parametrize("device", devices(NONCAUSAL))
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_fused_backward_of_256_wide_heads(gen, dtype, device):
    # D = 256: the queries' passes take dden_t from the M-wide numerator and dq 64 columns at a time (float32:
    # past the float kernels' D <= 128, the portable path).
    assert_noncausal_close(*noncausal_case(gen, 1, 2, 130, 100, 256, 32, dtype, device), dtype)
    q, k = (randn(gen, 1, 2, 130, 256, dtype=dtype, device=device) for _ in range(2))
    v = randn(gen, 1, 2, 130, 32, dtype=dtype, device=device)
    grad_out = randn(gen, 1, 2, 130, 32, dtype=dtype, device=device)
    (out, kv, z), grads = gradients(q, k, v, grad_out)
    _, expected = gradients(*(t.double().cpu() for t in (q, k, v)), grad_out.double().cpu())
    for name, a, b in zip(("query", "key", "value"), grads, expected):
        assert_close(a, b, grad_tol(dtype), f"grad {name}")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("causal", [True, False])
def test_fused_linear_attention_queries_without_features_in_half(gen, causal, device):
    # relu makes every fifth query row all zero: den = eps, dout / den past the half range. The kernels never
    # round dout / den to half (they use q / den, 0 here): finite gradients, within tolerance of float64.
    dtype = torch.float16
    B, H, L, D = 1, 2, 150, 16
    q = randn(gen, B, H, L, D, dtype=dtype, device=device)
    q[:, :, 4::5] = -q[:, :, 4::5].abs() - 0.1
    k, v = (randn(gen, B, H, L, D, dtype=dtype, device=device) for _ in range(2))
    grad_out = randn(gen, B, H, L, D, dtype=dtype, device=device)
    options = dict(feature_map="relu")

    def run(*inputs, module):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs[:3]]
        out = (module.causal_linear_attention(*leaves, initial_z=inputs[3], **options)[0] if causal
               else module.linear_attention(*leaves, **options))
        return out, torch.autograd.grad(out, leaves, inputs[4].to(out.dtype))

    z0 = (torch.rand(B, H, D, generator=gen) + 0.5).to(device)  # den = <q, z> + eps > 0 but for the zero rows
    out, grads = run(q, k, v, z0, grad_out, module=F)
    ref, ref_grads = run(*(t.double().cpu() for t in (q, k, v, z0, grad_out)), module=R)
    assert_close(out, ref, FORWARD_TOL[dtype], "out")
    for name, a, b in zip(("query", "key", "value"), grads, ref_grads):
        assert_close(a, b, grad_tol(dtype), f"grad {name}")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("causal", [True, False])
def test_fused_split_schedule_ops_do_not_grow_with_segments(gen, causal, device, monkeypatch):
    # One sequence of 1024 rows runs as 4 segments of 256 for the 132 multiprocessors the build assumes, one of
    # 4096 rows as 16: the segments' scans and sums are one cumulative sum each, so a call makes as many ops
    # (and kernel launches) at either length. The host loop over segments they replace made 3 more a segment.
    if device == "cpu":
        monkeypatch.setenv("FLOWFORMER_EMULATE_CUDA", "1")  # the fused kernels' emulated build
    fn = F.causal_linear_attention if causal else F.linear_attention

    def ops_of(L):
        q, k, v, grad_out = (randn(gen, 1, 1, L, 16, device=device, dtype=torch.bfloat16) for _ in range(4))
        leaves = [t.requires_grad_(True) for t in (q, k, v)]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = fn(*leaves)
            out = out[0] if causal else out
            torch.autograd.grad(out, leaves, grad_out)
        return sorted(e.key for e in prof.key_averages() for _ in range(e.count))

    short, long = ops_of(1024), ops_of(4096)
    assert "aten::cumsum" in short  # the split schedule ran
    assert short == long
