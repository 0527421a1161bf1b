"""Benchmark flowformer's linear attention (causal: causal_linear_attention; non-causal: linear_attention,
elu + 1 features, normalised) against the eager reference (flowformer.reference: the paper's einsum code,
optionally also under torch.compile), torch's scaled_dot_product_attention (softmax attention, causal
where the mode is), and, when it is installed, flash-linear-attention's Triton `chunk_linear_attn`
(causal only; same normalisation; its inputs go through the same feature map first, timed with it).
See harness.py for what is measured and written.

    python benchmarks/bench_linear_attention.py --device cpu --lengths 1024,4096 --out benchmarks/results/cpu
"""

import torch
import torch.nn.functional as TF

from flowformer import functional as F
from flowformer import reference as R
from harness import Suite, main


def flash_linear_attention():
    """fla's chunk_linear_attn, or None when flash-linear-attention is not installed."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        return None

    def run(q, k, v, causal):
        assert causal, "chunk_linear_attn is causal"
        phi = lambda x: TF.elu(x.transpose(1, 2)) + 1  # noqa: E731  (B, L, H, D), its layout
        out, _ = chunk_linear_attn(phi(q), phi(k), v.transpose(1, 2), scale=1.0, normalize=True)
        return out.transpose(1, 2)

    return run


def ours(q, k, v, causal):
    return F.causal_linear_attention(q, k, v)[0] if causal else F.linear_attention(q, k, v)


def reference(q, k, v, causal):
    return R.causal_linear_attention(q, k, v)[0] if causal else R.linear_attention(q, k, v)


def make_impls(compile_reference: bool):
    impls = {
        "flowformer": ours,
        "reference": reference,
        "sdpa": lambda q, k, v, causal: TF.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }
    if compile_reference:
        compiled = torch.compile(reference)
        impls["reference_compiled"] = compiled
    fla = flash_linear_attention()
    if fla is not None:
        impls["fla_chunk"] = lambda q, k, v, causal: fla(q, k, v, causal) if causal else ours(q, k, v, causal)
    return impls


def min_bytes(args, L, itemsize, backward):
    """q, k, v read and out written once; the backward reads q, k, v, grad_out and writes three gradients
    (the D x M states are negligible)."""
    B, H, D = args.batch, args.heads, args.dim
    return B * H * L * D * itemsize * (4 + (7 if backward else 0))


def reference_bytes(args, L, causal, itemsize):
    """What the eager reference holds at once: its (B, H, L, D, M) prefix sums in causal mode."""
    B, H, D = args.batch, args.heads, args.dim
    return 3 * B * H * L * D * D * itemsize if causal else 8 * B * H * L * D * itemsize


SUITE = Suite("linear_attention", {"noncausal": False, "causal": True}, make_impls, min_bytes, reference_bytes)

if __name__ == "__main__":
    main(SUITE, __doc__)
