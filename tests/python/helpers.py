"""Shared by the op tests: devices, tolerances (spec), random inputs, error measures."""

import os
import sys

import pytest
import torch

# Norm-wise relative error bounds against a float64 reference (spec/flow_attention.md, "Numerics").
FORWARD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def grad_tol(dtype):
    return 2 * FORWARD_TOL[dtype]


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def devices(op: str):
    """cpu, and cuda as a case that is skipped where there is no GPU or no CUDA kernel of `op` yet."""
    reason = None
    if not torch.cuda.is_available():
        reason = "no GPU"
    elif not has_kernel(op, "CUDA"):
        reason = f"{op} has no CUDA kernel in this build"
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(reason is not None, reason=str(reason)))]


def randn(gen, *shape, dtype=torch.float32, device="cpu", scale=1.0):
    """Fresh standard-normal values (never zeros), drawn on the CPU then moved."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def rel_err(actual, expected):
    """||actual - expected|| / ||expected||, in float64; NaN anywhere never passes."""
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(actual, expected, tol, what=""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def conditioned_grad_tol(dtype, roundoff):
    """The spec's gradient bound, or where the inputs make a gradient ill-conditioned (its true value
    comes from cancelling terms, e.g. O(eps) when the output is scale-invariant in it): 8x what the
    reference itself loses in float32 on these inputs (`roundoff`, from reference_roundoff), rescaled to
    the unit roundoff of dtype. Any implementation must lose that much; a wrong gradient is off by O(1)
    and still fails."""
    roundoff_ratio = torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
    return max(grad_tol(dtype), 8 * roundoff_ratio * roundoff)


def grads_of(fn, inputs, grad_outputs):
    """The outputs of fn(*inputs) (a tensor or a tuple) and the gradients of sum <output, grad_output> with
    respect to every input (None where an input does not reach them)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [o.detach() for o in outs], torch.autograd.grad(outs, leaves, grad_outputs, allow_unused=True)


def reference_roundoff(ref, inputs, grad_outputs, neighbours=4):
    """What the reference itself loses in float32 on these inputs: for each input, the largest relative error
    of its gradient (the reference in float32 against float64), on the inputs and on `neighbours` inputs
    next to them (each element moved by up to 2 units in the last place of float32). One sample is not
    enough: an ill-conditioned gradient can land exactly by luck (seen: 8.5e-7 on the inputs, 9e-5 one unit
    in the last place away)."""
    gen = torch.Generator().manual_seed(0)
    grad32 = [t.float().cpu() for t in grad_outputs]
    worst = None
    for trial in range(neighbours + 1):
        xs = [t.float().cpu() for t in inputs]
        if trial > 0:
            xs = [x * (1 + torch.finfo(torch.float32).eps * torch.randint(-2, 3, x.shape, generator=gen)) for x in xs]
        _, g32 = grads_of(ref, xs, grad32)
        _, g64 = grads_of(ref, [x.double() for x in xs], [g.double() for g in grad32])
        errs = [0.0 if b is None else rel_err(a, b) for a, b in zip(g32, g64)]
        worst = errs if worst is None else [max(w, e) for w, e in zip(worst, errs)]
    return worst


def grads(fn, inputs, grad_out):
    """The output of fn(*inputs) (one tensor) and the gradients of <output, grad_out> (grads_of)."""
    outs, gradients = grads_of(fn, inputs, [grad_out])
    return outs[0], gradients


def check_gradients(op, reference, q, k, v, gen, tol_scale=1.0, **options):
    """The gradients of <op(q, k, v, **options), grad_out> (a fresh grad_out) against reference's on float64 CPU
    copies of the inputs (NaN as 0), each held to the dtype's gradient bound (grad_tol) times tol_scale; returns
    op's gradients."""
    grad_out = randn(gen, *q.shape[:3], v.shape[3], dtype=q.dtype, device=q.device)
    _, got = grads(lambda *x: op(*x, **options), (q, k, v), grad_out)
    cpu_options = {name: (x.cpu() if torch.is_tensor(x) else x) for name, x in options.items()}
    _, expected = grads(lambda *x: reference(*x, **cpu_options),
                        [t.detach().double().cpu().nan_to_num() for t in (q, k, v)], grad_out.double().cpu())
    for name, a, b in zip(("query", "key", "value"), got, expected):
        assert a.dtype == q.dtype and a.shape == b.shape
        assert_close(a, b, tol_scale * grad_tol(q.dtype), f"grad {name}")
    return got


PADDINGS = ["left", "right", "random", "an element without queries", "an element without keys"]


def ops_made(fn):
    """The ops (profiler keys, one entry a call) that fn() makes, sorted: what a call's launches and host ops
    are, for tests that they do not grow with segments or sequences."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted(e.key for e in prof.key_averages() for _ in range(e.count))


def padding_masks(gen, padding, B, L, S):
    """Query and key padding masks (B, L), (B, S) of one of PADDINGS's kinds (B >= 3)."""
    qpad = torch.zeros(B, L, dtype=torch.bool)
    kpad = torch.zeros(B, S, dtype=torch.bool)
    if padding == "left":
        qpad[0, :70] = True
        kpad[1, :5] = True
    elif padding == "right":
        qpad[0, 100:] = True
        kpad[2, 64:] = True
    elif padding == "random":
        qpad = torch.rand(B, L, generator=gen) < 0.2
        kpad = torch.rand(B, S, generator=gen) < 0.2
    elif padding == "an element without queries":
        qpad[1] = True
    else:  # an element without keys
        kpad[2] = True
    return qpad, kpad


def features_input(gen, shape, feature_map, dtype=torch.float32, device="cpu"):
    """Inputs for the feature map: non-negative for identity; for relu, every row keeps a positive
    feature (a row of zero features makes the normaliser eps and its gradient O(1 / eps))."""
    x = randn(gen, *shape)
    if feature_map == "identity":
        x = x.abs()
    elif feature_map == "relu":
        x[..., 0] = x[..., 0].abs() + 0.1
    return x.to(dtype=dtype, device=device)


def leave_spawned_rank():
    """Ends a spawned rank that passed, after destroy_process_group, without interpreter finalization. Torch's
    gloo worker thread releases the last collective's tensors after the collective has completed; if that
    release still waits for the GIL when finalization starts, the thread is unwound inside a noexcept
    destructor and the process aborts ("terminate called without an active exception"; pytorch/pytorch PR
    179291). A rank that fails raises before this, so mp.spawn still reports its error."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
