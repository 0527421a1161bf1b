"""Benchmark flowformer::flow_attention against the eager reference (flowformer.reference: the paper's
einsum code, optionally also under torch.compile) and torch's scaled_dot_product_attention (softmax
attention, the quadratic peer). See harness.py for what is measured and written.

    python benchmarks/bench_flow_attention.py --device cpu --lengths 1024,4096 --out benchmarks/results/cpu
"""

import torch
import torch.nn.functional as TF

from flowformer import functional as F
from flowformer import reference as R
from harness import Suite, main


def make_impls(compile_reference: bool):
    impls = {
        "flowformer": lambda q, k, v, causal: F.flow_attention(q, k, v, causal=causal),
        "reference": lambda q, k, v, causal: R.flow_attention(q, k, v, causal=causal),
        "sdpa": lambda q, k, v, causal: TF.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }
    if compile_reference:
        compiled = torch.compile(R.flow_attention)
        impls["reference_compiled"] = lambda q, k, v, causal: compiled(q, k, v, causal=causal)
    return impls


def min_bytes(args, L, itemsize, backward):
    """q, k, v read and out written once; the backward reads q, k, v, grad_out and writes three gradients."""
    B, H, D = args.batch, args.heads, args.dim
    return B * H * L * D * itemsize * (4 + (7 if backward else 0))


def reference_bytes(args, L, causal, itemsize):
    """What the eager reference holds at once: its (B, H, L, D, M) tensors in causal mode."""
    B, H, D = args.batch, args.heads, args.dim
    return 3 * B * H * L * D * D * itemsize if causal else 16 * B * H * L * D * itemsize


SUITE = Suite("flow_attention", {"noncausal": False, "causal": True}, make_impls, min_bytes, reference_bytes)

if __name__ == "__main__":
    main(SUITE, __doc__)
