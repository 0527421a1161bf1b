"""aft_full (AFT-full, AFT-local) and aft_simple against the float64 reference of spec/aft.md: outputs
and gradients (pos_bias included), every dtype, causal and windowed, L != S, strides, the spec's
adversarial ranges; gradcheck, opcheck, torch.compile, errors."""

import pytest
import torch

from flowformer import functional as F
from flowformer import reference as R
from helpers import DTYPES, FORWARD_TOL, assert_close, devices, grad_tol, randn

FULL = "flowformer::aft_full"
SIMPLE = "flowformer::aft_simple"
# (B, L, S, C, causal, window)
FULL_CASES = [(2, 9, 7, 5, False, 0), (2, 9, 9, 5, True, 0), (2, 13, 11, 4, False, 3), (1, 13, 13, 4, True, 3),
              (2, 1, 6, 3, False, 0), (2, 6, 1, 3, False, 2), (1, 70, 70, 3, True, 8), (1, 40, 50, 2, False, 100)]


def full_inputs(gen, B, L, S, C, dtype, device, key_range=1.0, bias_range=1.0):
    q = randn(gen, B, L, C, dtype=dtype, device=device)
    k = ((torch.rand(B, S, C, generator=gen, dtype=torch.float64) * 2 - 1) * key_range).to(dtype).to(device)
    v = randn(gen, B, S, C, dtype=dtype, device=device)
    w = ((torch.rand(L, S, generator=gen, dtype=torch.float64) * 2 - 1) * bias_range).to(dtype).to(device)
    return q, k, v, w


def check_against_reference(op, ref, inputs, grad_out, dtype, tol_scale=1.0):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = op(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in inputs]
    ref_out = ref(*ref_leaves)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad_out.double().cpu())
    assert out.dtype == inputs[0].dtype and out.shape == ref_out.shape
    assert_close(out, ref_out, FORWARD_TOL[dtype] * tol_scale, "output")
    for name, a, b in zip(("query", "key", "value", "pos_bias"), grads, ref_grads):
        assert a.dtype == inputs[0].dtype or name == "pos_bias"
        assert_close(a, b, grad_tol(dtype) * tol_scale, f"grad {name}")


@pytest.mark.parametrize("device", devices(FULL))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FULL_CASES)
def test_aft_full_parity(gen, case, dtype, device):
    B, L, S, C, causal, window = case
    q, k, v, w = full_inputs(gen, B, L, S, C, dtype, device)
    grad_out = randn(gen, B, L, C, dtype=dtype, device=device)
    check_against_reference(lambda *x: F.aft_full(*x, causal=causal, window=window),
                            lambda *x: R.aft_full(*x, causal=causal, window=window), (q, k, v, w), grad_out, dtype)


@pytest.mark.parametrize("device", devices(FULL))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [0, 4])
def test_aft_full_adversarial_ranges(gen, causal, window, device):
    # Keys across [-80, 80] (magnitudes differing wildly between positions), biases across [-30, 30]:
    # exact in float32, never NaN. Keys that rise along the sequence starve the causal prefix sums.
    B, L, C = 2, 48, 6
    q, k, v, w = full_inputs(gen, B, L, L, C, torch.float32, device, key_range=80.0, bias_range=30.0)
    k[1] = torch.linspace(-80, 80, L, device=device)[:, None].expand(L, C)
    grad_out = randn(gen, B, L, C, device=device)
    check_against_reference(lambda *x: F.aft_full(*x, causal=causal, window=window),
                            lambda *x: R.aft_full(*x, causal=causal, window=window), (q, k, v, w), grad_out,
                            torch.float32)


@pytest.mark.parametrize("device", devices(FULL))
@pytest.mark.parametrize("C", [64, 67, 130])
@pytest.mark.parametrize("causal,window", [(False, 0), (True, 0), (False, 3), (True, 5)])
def test_aft_full_channel_blocks(gen, causal, window, C, device):
    # The CPU runs the windowed items over blocks of 64 channels (ChannelBlock): full blocks and tails.
    B, L = 2, 19
    q, k, v, w = full_inputs(gen, B, L, L, C, torch.float32, device, key_range=4.0, bias_range=3.0)
    grad_out = randn(gen, B, L, C, device=device)
    check_against_reference(lambda *x: F.aft_full(*x, causal=causal, window=window),
                            lambda *x: R.aft_full(*x, causal=causal, window=window), (q, k, v, w), grad_out,
                            torch.float32)


def softmax_statistics(k, v, w, causal, window):
    """Float64 y (the softmax average before the gate) and lse (log of its denominator), (B, L, C)."""
    L, S = w.shape
    t, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    bias = torch.where((t - j).abs() < window, w, torch.zeros_like(w)) if window > 0 else w
    logits = k[:, None] + bias[None, :, :, None]  # (B, L, S, C)
    if causal:
        logits = logits.masked_fill((j > t)[None, :, :, None], float("-inf"))
    return (torch.softmax(logits, 2) * v[:, None]).sum(2), torch.logsumexp(logits, 2)


@pytest.mark.parametrize("device", devices(FULL))
@pytest.mark.parametrize("causal,window", [(False, 0), (True, 0), (False, 4), (True, 4)])
def test_aft_full_forward_statistics(gen, causal, window, device):
    # aft_full_forward's y and lse (what the backward uses instead of a second forward), exact in float32
    # also in the adversarial ranges, where many elements take the robust path.
    q, k, v, w = full_inputs(gen, 2, 30, 30, 5, torch.float32, device, key_range=80.0, bias_range=30.0)
    out, y, lse = torch.ops.flowformer.aft_full_forward(q, k, v, w, causal=causal, window=window)
    ref_y, ref_lse = softmax_statistics(*(t.double().cpu() for t in (k, v, w)), causal, window)
    assert y.dtype == lse.dtype == torch.float32 and y.shape == lse.shape == q.shape
    assert_close(y, ref_y, 1e-5, "y")
    torch.testing.assert_close(lse.double().cpu(), ref_lse, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(out, F.aft_full(q, k, v, w, causal=causal, window=window), rtol=0, atol=0)


def test_aft_full_backward_checks_statistics(gen):
    q, k, v, w = full_inputs(gen, 2, 5, 5, 3, torch.float32, "cpu")
    _, y, lse = torch.ops.flowformer.aft_full_forward(q, k, v, w)
    with pytest.raises(RuntimeError, match=r"flowformer::aft_full_backward: lse \(saved by aft_full_forward\) must "
                                           r"be Float on cpu, got Double"):
        torch.ops.flowformer.aft_full_backward(q, q, k, v, w, y, lse.double(), causal=False, window=0)
    with pytest.raises(RuntimeError, match=r"flowformer::aft_full_backward: y \(saved by aft_full_forward\) must "
                                           r"have the shape of query"):
        torch.ops.flowformer.aft_full_backward(q, q, k, v, w, y[:, :2], lse, causal=False, window=0)


@pytest.mark.parametrize("device", devices(FULL))
@pytest.mark.parametrize("L", [33, 150])
def test_aft_full_causal_rising_keys(gen, L, device):
    # Keys rising from -80 to 80 along the sequence (different slopes per channel, some falling): the
    # global factorisation underflows in the early rows, the rescaled one (blocks of 32 rows) mostly not;
    # what remains takes the exact path. Outputs and all gradients against float64.
    B, C = 2, 4
    q, k, v, w = full_inputs(gen, B, L, L, C, torch.float32, device, bias_range=5.0)
    slopes = torch.tensor([1.0, 0.5, -0.25, 0.05], device=device)
    k = (torch.linspace(-80, 80, L, device=device)[:, None] * slopes + k[0]).expand(B, L, C).contiguous()
    grad_out = randn(gen, B, L, C, device=device)
    check_against_reference(lambda *x: F.aft_full(*x, causal=True), lambda *x: R.aft_full(*x, causal=True),
                            (q, k, v, w), grad_out, torch.float32)


@pytest.mark.parametrize("device", devices(SIMPLE))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("key_range", [1.0, 80.0])
@pytest.mark.parametrize("C", [5, 70])  # 70: a full block of 64 channel lanes on the CPU, and a tail
def test_aft_simple_parity(gen, C, key_range, causal, dtype, device):
    B, L = 2, 37
    S = L if causal else 23
    q, k, v, _ = full_inputs(gen, B, L, S, C, dtype, device, key_range=key_range)
    grad_out = randn(gen, B, L, C, dtype=dtype, device=device)
    check_against_reference(lambda *x: F.aft_simple(*x, causal=causal),
                            lambda *x: R.aft_simple(*x, causal=causal), (q, k, v), grad_out, dtype)


@pytest.mark.parametrize("device", devices(FULL))
def test_non_contiguous(gen, device):
    B, L, C = 2, 12, 4
    q, k, v = (randn(gen, B, C, L, device=device).transpose(1, 2) for _ in range(3))
    w = randn(gen, L, L, device=device).t()
    assert not q.is_contiguous() and not w.is_contiguous()
    for causal in (False, True):
        assert_close(F.aft_full(q, k, v, w, causal=causal, window=3),
                     R.aft_full(*(t.double() for t in (q, k, v, w)), causal=causal, window=3), 1e-5, "aft_full")
        assert_close(F.aft_simple(q, k, v, causal=causal),
                     R.aft_simple(*(t.double() for t in (q, k, v)), causal=causal), 1e-5, "aft_simple")


@pytest.mark.parametrize("device", devices(FULL))
@pytest.mark.parametrize("causal,window", [(False, 0), (True, 0), (False, 2), (True, 3)])
def test_gradcheck_aft_full(gen, causal, window, device):
    q, k, v, w = (t.requires_grad_() for t in full_inputs(gen, 2, 6, 6, 3, torch.float64, device))
    assert torch.autograd.gradcheck(lambda *x: F.aft_full(*x, causal=causal, window=window), (q, k, v, w))


@pytest.mark.parametrize("device", devices(SIMPLE))
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_aft_simple(gen, causal, device):
    q, k, v, _ = (t.requires_grad_() for t in full_inputs(gen, 2, 6, 6, 3, torch.float64, device))
    assert torch.autograd.gradcheck(lambda *x: F.aft_simple(*x, causal=causal), (q, k, v))


@pytest.mark.parametrize("device", devices(FULL))
def test_opcheck(gen, device):
    for requires_grad in (False, True):
        q, k, v, w = (t.requires_grad_(requires_grad) for t in full_inputs(gen, 2, 7, 7, 3, torch.float64, device))
        for kwargs in ({}, {"causal": True}, {"window": 2}, {"causal": True, "window": 3}):
            torch.library.opcheck(torch.ops.flowformer.aft_full.default, (q, k, v, w), kwargs)
            torch.library.opcheck(torch.ops.flowformer.aft_full_forward.default, (q, k, v, w), kwargs)
            _, y, lse = torch.ops.flowformer.aft_full_forward(q, k, v, w, **kwargs)
            backward_args = tuple(t.detach() for t in (torch.randn_like(q), q, k, v, w, y, lse))
            torch.library.opcheck(torch.ops.flowformer.aft_full_backward.default, backward_args,
                                  {"causal": False, "window": 0, **kwargs})
        for kwargs in ({}, {"causal": True}):
            torch.library.opcheck(torch.ops.flowformer.aft_simple.default, (q, k, v), kwargs)


@pytest.mark.parametrize("device", devices(FULL))
def test_backward_is_deterministic(gen, device):
    q, k, v, w = (t.requires_grad_() for t in full_inputs(gen, 2, 40, 40, 8, torch.float32, device, 80.0, 30.0))
    for window in (0, 5):
        first = torch.autograd.grad(F.aft_full(q, k, v, w, causal=True, window=window).sum(), (q, k, v, w))
        second = torch.autograd.grad(F.aft_full(q, k, v, w, causal=True, window=window).sum(), (q, k, v, w))
        assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_compile_fullgraph(gen):
    q, k, v, w = (t.requires_grad_() for t in full_inputs(gen, 2, 10, 10, 4, torch.float32, "cpu"))

    def model(q_, k_, v_, w_):
        return (F.aft_full(q_.tanh(), k_, v_, w_, causal=True, window=3) + F.aft_simple(q_, k_, v_)).sum()

    compiled = torch.compile(model, fullgraph=True)
    for a, b in zip(torch.autograd.grad(compiled(q, k, v, w), (q, k, v, w)),
                    torch.autograd.grad(model(q, k, v, w), (q, k, v, w))):
        torch.testing.assert_close(a, b)


class AftMixer(torch.nn.Module):
    """aft_full (AFT-local, causal), aft_simple and aft_conv on (B, 12, 8) tokens, a 3 x 4 grid for aft_conv."""

    def __init__(self):
        super().__init__()
        self.pos_bias = torch.nn.Parameter(torch.randn(12, 12))
        self.weight = torch.nn.Parameter(torch.randn(2, 3, 3))

    def forward(self, x):
        B = x.shape[0]
        local = F.aft_full(x, x.tanh(), x, self.pos_bias, causal=True, window=3)
        grid = x.view(B, 3, 4, 8)
        conv = F.aft_conv(grid, grid.sin(), grid, self.weight).view(B, 12, 8)
        return local + F.aft_simple(x, x.cos(), x) + conv


def test_export(gen):
    model = AftMixer()
    exported = torch.export.export(model, (randn(gen, 2, 12, 8),),
                                   dynamic_shapes={"x": {0: torch.export.Dim("batch", max=64)}})
    targets = {str(node.target) for node in exported.graph.nodes}
    for op in ("aft_full", "aft_simple", "aft_conv"):
        assert any(f"flowformer.{op}" in t for t in targets), op
    x = randn(gen, 5, 12, 8)
    torch.testing.assert_close(exported.module()(x), model(x))


def test_compile_fullgraph_all_ops(gen):
    model = AftMixer()
    x = randn(gen, 2, 12, 8).requires_grad_()
    compiled = torch.compile(model, fullgraph=True)
    params = [x, *model.parameters()]
    for a, b in zip(torch.autograd.grad(compiled(x).square().sum(), params),
                    torch.autograd.grad(model(x).square().sum(), params)):
        torch.testing.assert_close(a, b)


def test_errors(gen):
    q, k, v, w = full_inputs(gen, 2, 5, 4, 3, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"flowformer::aft_full: pos_bias must have length S = 4 \(as key\), got 3"):
        F.aft_full(q, k, v, w[:, :3])
    with pytest.raises(RuntimeError, match=r"flowformer::aft_full: causal=True requires query and key of the same"):
        F.aft_full(q, k, v, w, causal=True)
    with pytest.raises(RuntimeError, match=r"flowformer::aft_full: window must be >= 0"):
        F.aft_full(q, k, v, w, window=-1)
    with pytest.raises(RuntimeError, match=r"flowformer::aft_simple: value must have channels C = 3"):
        F.aft_simple(q, k, v[..., :2])
    with pytest.raises(RuntimeError, match=r"flowformer::aft_simple: query must be a 3-D tensor \(B, L, C\)"):
        F.aft_simple(q[0], k, v)


@pytest.mark.parametrize("causal", [False, True])
def test_empty_inputs(gen, causal):
    q, k, v, w = (t.requires_grad_() for t in full_inputs(gen, 2, 0, 0, 3, torch.float32, "cpu"))
    out = F.aft_full(q, k, v, w, causal=causal)
    assert out.shape == (2, 0, 3)
    out.sum().backward()
    q, k, v, w = full_inputs(gen, 2, 4, 0, 3, torch.float32, "cpu")
    assert (F.aft_full(q, k, v, w) == 0).all()


CONV = "flowformer::aft_conv"


def conv_inputs(gen, B, Hi, Wi, C, heads, s, dtype, device, key_range=1.0, bias_range=1.0):
    q = randn(gen, B, Hi, Wi, C, dtype=dtype, device=device)
    k = ((torch.rand(B, Hi, Wi, C, generator=gen, dtype=torch.float64) * 2 - 1) * key_range).to(dtype).to(device)
    v = randn(gen, B, Hi, Wi, C, dtype=dtype, device=device)
    w = ((torch.rand(heads, s, s, generator=gen, dtype=torch.float64) * 2 - 1) * bias_range).to(dtype).to(device)
    return q, k, v, w


@pytest.mark.parametrize("device", devices(CONV))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 6, 4, 2, 3), (1, 7, 4, 6, 3, 5), (2, 3, 3, 2, 1, 7), (1, 1, 8, 2, 2, 3),
                                   (1, 4, 5, 132, 2, 3), (1, 3, 4, 64, 1, 3), (2, 9, 11, 4, 2, 5)])
def test_aft_conv_parity(gen, shape, dtype, device):
    B, Hi, Wi, C, heads, s = shape
    inputs = conv_inputs(gen, B, Hi, Wi, C, heads, s, dtype, device)
    grad_out = randn(gen, B, Hi, Wi, C, dtype=dtype, device=device)
    check_against_reference(F.aft_conv, R.aft_conv, inputs, grad_out, dtype)


@pytest.mark.parametrize("device", devices(CONV))
def test_aft_conv_adversarial_ranges(gen, device):
    # 72 positions: the weight gradient's partial sums span two chunks of 64 positions.
    inputs = conv_inputs(gen, 2, 9, 8, 4, 2, 3, torch.float32, device, key_range=80.0, bias_range=30.0)
    grad_out = randn(gen, 2, 9, 8, 4, device=device)
    check_against_reference(F.aft_conv, R.aft_conv, inputs, grad_out, torch.float32)


def test_aft_conv_kernel_offset_convention():
    # One head, a 3 x 3 kernel whose only large entry is at [0, 2]: dy = -1, dx = +1, so every position
    # attends (almost only) to its upper-right neighbour.
    B, Hi, Wi, C = 1, 4, 4, 1
    weight = torch.full((1, 3, 3), -30.0)
    weight[0, 0, 2] = 30.0
    k = torch.zeros(B, Hi, Wi, C)
    v = torch.arange(Hi * Wi, dtype=torch.float32).reshape(B, Hi, Wi, C)
    q = torch.full((B, Hi, Wi, C), 30.0)  # sigmoid = 1
    out = F.aft_conv(q, k, v, weight)
    assert torch.allclose(out[0, 1, 1, 0], v[0, 0, 2, 0], atol=1e-4)
    assert torch.allclose(out[0, 2, 2, 0], v[0, 1, 3, 0], atol=1e-4)


@pytest.mark.parametrize("device", devices(CONV))
def test_aft_conv_gradcheck_and_opcheck(gen, device):
    inputs = [t.requires_grad_() for t in conv_inputs(gen, 2, 3, 4, 4, 2, 3, torch.float64, device)]
    assert torch.autograd.gradcheck(F.aft_conv, inputs)
    torch.library.opcheck(torch.ops.flowformer.aft_conv.default, tuple(inputs))


def test_aft_conv_errors(gen):
    q, k, v, w = conv_inputs(gen, 1, 3, 3, 4, 2, 3, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"flowformer::aft_conv: weight must be \(heads, s, s\) with an odd"):
        F.aft_conv(q, k, v, w[:, :2, :2])
    with pytest.raises(RuntimeError, match=r"flowformer::aft_conv: the channels C = 4 must be divisible by heads = 3"):
        F.aft_conv(q, k, v, torch.zeros(3, 3, 3))
    with pytest.raises(RuntimeError, match=r"flowformer::aft_conv: query, key and value must have the same shape"):
        F.aft_conv(q, k[:, :2], v, w)
