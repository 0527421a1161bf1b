"""Benchmark flowformer::aft_full (AFT-full; also AFT-local with window 32 and aft_simple, for reference)
against the paper's matrix formulation in eager PyTorch (exp(w) @ (exp(k) v) over exp(w) @ exp(k), maxima
subtracted; optionally under torch.compile) and torch's scaled_dot_product_attention at matching shapes
(C = heads x dim channels split into heads). Inputs: query, key, value (B, L, C) and pos_bias (L, L).
See harness.py for what is measured and written.

    python benchmarks/bench_aft.py --device cpu --lengths 256,1024 --out benchmarks/results/cpu
"""

import torch
import torch.nn.functional as TF

from flowformer import functional as F
from flowformer import reference as R
from harness import Suite, main

LOCAL_WINDOW = 32


def inputs(args, L, device, dtype, requires_grad):
    gen = torch.Generator().manual_seed(L)
    C = args.heads * args.dim
    ts = [torch.randn(args.batch, L, C, generator=gen) for _ in range(3)] + [torch.randn(L, L, generator=gen)]
    ts = [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in ts]
    return ts, torch.randn(args.batch, L, C, generator=gen).to(device=device, dtype=dtype)


def matrix_formulation(q, k, v, w, causal):
    ew = torch.exp(w - w.amax(1, keepdim=True))
    if causal:
        ew = ew.tril()
    ek = torch.exp(k - k.amax(1, keepdim=True))
    return torch.sigmoid(q) * (ew @ (ek * v)) / (ew @ ek)


def make_sdpa(heads):
    def sdpa(q, k, v, w, causal):
        B, L, C = q.shape
        split = lambda x: x.view(B, L, heads, C // heads).transpose(1, 2)  # noqa: E731
        out = TF.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=causal)
        return out.transpose(1, 2).reshape(B, L, C) + 0 * w.sum()
    return sdpa


def make_impls(compile_reference: bool, heads: int = 8):
    impls = {
        "flowformer": lambda q, k, v, w, causal: F.aft_full(q, k, v, w, causal=causal),
        "flowformer_local": lambda q, k, v, w, causal: F.aft_full(q, k, v, w, causal=causal, window=LOCAL_WINDOW),
        "flowformer_simple": lambda q, k, v, w, causal: F.aft_simple(q, k, v, causal=causal) + 0 * w.sum(),
        "reference": matrix_formulation,
        "sdpa": make_sdpa(heads),
    }
    if compile_reference:
        impls["reference_compiled"] = torch.compile(matrix_formulation)
    return impls


def min_bytes(args, L, itemsize, backward):
    """q, k, v read and out written once, the (L, L) bias read once; the backward also reads grad_out and
    writes three gradients and the bias gradient."""
    BLC = args.batch * L * args.heads * args.dim
    return itemsize * (4 * BLC + L * L + ((7 * BLC + 2 * L * L) if backward else 0))


def reference_bytes(args, L, causal, itemsize):
    return itemsize * (8 * args.batch * L * args.heads * args.dim + 3 * L * L)


SUITE = Suite("aft_full", {"full": False, "causal": True}, make_impls, min_bytes, reference_bytes, inputs=inputs,
              description=f"flowformer_local: window {LOCAL_WINDOW}; flowformer_simple: aft_simple (no bias).")

if __name__ == "__main__":
    main(SUITE, __doc__)
