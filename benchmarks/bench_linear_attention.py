"""Benchmark flowformer's linear attention (elu + 1 features; causal: causal_linear_attention, normalised or
not; non-causal: linear_attention) against the eager reference (flowformer.reference: the paper's einsum
code, optionally also under torch.compile), torch's scaled_dot_product_attention (softmax attention,
causal where the mode is), and, when it is installed, flash-linear-attention's Triton `chunk_linear_attn`
(causal only, normalised or not as the mode says; its inputs go through the same feature map first,
timed with it). See harness.py for what is measured and written.

    python benchmarks/bench_linear_attention.py --device cpu --lengths 1024,4096 --out benchmarks/results/cpu
"""

from typing import NamedTuple

import torch
import torch.nn.functional as TF

from flowformer import functional as F
from flowformer import reference as R
from harness import Suite, main


class Mode(NamedTuple):
    causal: bool
    normalize: bool = True


MODES = {"noncausal": Mode(False), "causal": Mode(True), "causal_unnormalized": Mode(True, normalize=False)}


def flash_linear_attention():
    """fla's chunk_linear_attn, or None when flash-linear-attention is not installed."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        return None

    def run(q, k, v, mode):
        phi = lambda x: TF.elu(x.transpose(1, 2)) + 1  # noqa: E731  (B, L, H, D), its layout
        out, _ = chunk_linear_attn(phi(q), phi(k), v.transpose(1, 2), scale=1.0, normalize=mode.normalize)
        return out.transpose(1, 2)

    return run


def ours(q, k, v, mode):
    if mode.causal:
        return F.causal_linear_attention(q, k, v, normalize=mode.normalize)[0]
    return F.linear_attention(q, k, v)


def reference(q, k, v, mode):
    if mode.causal:
        return R.causal_linear_attention(q, k, v, normalize=mode.normalize)[0]
    return R.linear_attention(q, k, v)


def make_impls(compile_reference: bool):
    impls = {
        "flowformer": ours,
        "reference": reference,
        "sdpa": lambda q, k, v, mode: TF.scaled_dot_product_attention(q, k, v, is_causal=mode.causal),
    }
    if compile_reference:
        impls["reference_compiled"] = torch.compile(reference)
    fla = flash_linear_attention()
    if fla is not None:
        impls["fla_chunk"] = fla
    return impls


def skip(impl, mode):
    if impl == "fla_chunk" and not mode.causal:
        return "flash-linear-attention has no non-causal linear attention"
    if impl == "sdpa" and not mode.normalize:
        return "softmax attention is normalised: see the causal mode"
    return None


def min_bytes(args, L, itemsize, backward):
    """q, k, v read and out written once; the backward reads q, k, v, grad_out and writes three gradients
    (the D x M states are negligible)."""
    B, H, D = args.batch, args.heads, args.dim
    return B * H * L * D * itemsize * (4 + (7 if backward else 0))


def reference_bytes(args, L, mode, itemsize):
    """What the eager reference holds at once: its (B, H, L, D, M) prefix sums in causal mode."""
    B, H, D = args.batch, args.heads, args.dim
    return 3 * B * H * L * D * D * itemsize if mode.causal else 8 * B * H * L * D * itemsize


SUITE = Suite("linear_attention", MODES, make_impls, min_bytes, reference_bytes, skip=skip)

if __name__ == "__main__":
    main(SUITE, __doc__)
