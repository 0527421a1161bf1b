"""Small CUDA cases of every op that has a CUDA kernel, forward and backward, for compute-sanitizer.

    compute-sanitizer --tool memcheck python tests/sanitizer_cases.py

Exits 0 after running every case; prints which ops have no CUDA kernel (nothing to check for them).
`--device cpu` is a dry run of the same cases on the CPU (with FLOWFORMER_EMULATE_CUDA=1: through the
CUDA kernels in the emulator), which the test suite runs so that the cases themselves stay runnable.
"""

import argparse

import torch

import flowformer  # noqa: F401

DEVICE = "cuda"

def flow_attention_case(options, dtype):
    B, H, L, D = 2, 3, 150, 16  # several chunks of 64 rows
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    mask[1, -5:] = True
    out = torch.ops.flowformer.flow_attention(q, k, v, key_padding_mask=mask, **options)
    out.backward(torch.randn_like(out))


def causal_linear_attention_case(options, dtype):
    B, H, L, D = 2, 3, 150, 16
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    kv0 = torch.randn(B, H, D, D, device=DEVICE, requires_grad=True)
    z0 = torch.rand(B, H, D, device=DEVICE, requires_grad=True)
    out, kv, z = torch.ops.flowformer.causal_linear_attention(q, k, v, initial_kv=kv0, initial_z=z0, **options)
    (out.float().sum() + kv.sum() + z.sum()).backward()
    kv, z = kv.detach().requires_grad_(), z.detach().requires_grad_()  # the graph above is freed
    step = torch.ops.flowformer.causal_linear_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], initial_kv=kv,
                                                        initial_z=z, **options)  # a decoding step
    step[0].float().sum().backward()


def packed_linear_attention_case(options, dtype):
    H, D, lengths = 2, 64, [70, 0, 1, 130]  # packed sequences, an empty one; the fused kernels' head dim
    cu = torch.tensor([0, 70, 70, 71, 201], device=DEVICE, dtype=torch.int32)
    q, k, v = (torch.randn(1, H, sum(lengths), D, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    out, kv, z = torch.ops.flowformer.causal_linear_attention(q, k, v, cu_seqlens=cu, **options)
    (out.float().sum() + kv.sum() + z.sum()).backward()


def split_linear_attention_case(options, dtype):
    # One long sequence (the split schedule of the fused kernels) and M = 128 over value tiles of the backward.
    L, D, M = 600, 32, 128
    q, k = (torch.randn(1, 1, L, D, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 1, L, M, device=DEVICE, dtype=dtype, requires_grad=True)
    out, kv, z = torch.ops.flowformer.causal_linear_attention(q, k, v, **options)
    (out.float().sum() + kv.sum() + z.sum()).backward()
    torch.ops.flowformer.linear_attention(q, k, v, **options).float().sum().backward()


def linear_attention_case(options, dtype):
    B, H, L, S, D = 2, 3, 150, 300, 16
    q = torch.randn(B, H, L, D, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, H, S, D, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    mask = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
    mask[1, -50:] = True
    out = torch.ops.flowformer.linear_attention(q, k, v, key_padding_mask=mask, **options)
    out.backward(torch.randn_like(out))


def causal_flow_attention_case(options, dtype):
    # Two pieces carrying the state, gradients through it (and of the final state).
    q, k, v = (torch.randn(2, 3, 150, 16, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    out, state = torch.ops.flowformer.causal_flow_attention(q[:, :, :70], k[:, :, :70], v[:, :, :70], **options)
    rest, final = torch.ops.flowformer.causal_flow_attention(q[:, :, 70:], k[:, :, 70:], v[:, :, 70:], state=state,
                                                             **options)
    (out.float().sum() + rest.float().sum() + final.sum()).backward()


def aft_full_case(options, dtype):
    B, L, C = 2, 70, 16
    q, k, v = (torch.randn(B, L, C, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    k.data[1].mul_(60)  # keys of very different magnitudes: some elements take the exact fallback
    w = torch.randn(L, L, device=DEVICE, dtype=dtype, requires_grad=True)
    torch.ops.flowformer.aft_full(q, k, v, w, **options).float().sum().backward()
    torch.ops.flowformer.aft_simple(q, k, v, causal=options["causal"]).float().sum().backward()


def aft_conv_case(options, dtype):
    q, k, v = (torch.randn(2, 7, 9, 8, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    w = torch.randn(2, 3, 3, device=DEVICE, dtype=dtype, requires_grad=True)
    torch.ops.flowformer.aft_conv(q, k, v, w).float().sum().backward()


def packed_flow_attention_case(options, dtype):
    # Packed sequences (one empty, one starting inside a chunk) from their own states, M = 128 over the backward
    # passes' value tiles, gradients of the final states too.
    H, D, M = 2, 16, 128
    cu = torch.tensor([0, 70, 70, 200], device=DEVICE)
    _, states = torch.ops.flowformer.causal_flow_attention(
        *(torch.randn(3, H, 20, n, device=DEVICE, dtype=dtype) for n in (D, D, M)), **options)
    q, k = (torch.randn(1, H, 200, D, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.randn(1, H, 200, M, device=DEVICE, dtype=dtype, requires_grad=True)
    out, final = torch.ops.flowformer.causal_flow_attention(q, k, v, state=states.requires_grad_(), cu_seqlens=cu,
                                                            **options)
    (out.float().sum() + final.sum()).backward()


# (op, function running one case, the options of each case)
CASES = [
    ("flowformer::flow_attention", flow_attention_case, [
        dict(causal=False), dict(causal=True), dict(causal=False, feature_map="elu1", clamp=float("inf")),
    ]),
    ("flowformer::causal_linear_attention", causal_linear_attention_case, [
        dict(), dict(normalize=False, feature_map="relu"),
    ]),
    ("flowformer::causal_linear_attention", packed_linear_attention_case, [dict(), dict(feature_map="sigmoid")]),
    ("flowformer::linear_attention", linear_attention_case, [dict()]),
    ("flowformer::causal_linear_attention", split_linear_attention_case, [dict(feature_map="elu1")]),
    ("flowformer::causal_flow_attention", causal_flow_attention_case, [dict(), dict(clamp=float("inf"))]),
    ("flowformer::causal_flow_attention", packed_flow_attention_case, [dict(feature_map="elu1")]),
    ("flowformer::aft_full", aft_full_case, [dict(causal=False), dict(causal=True), dict(causal=True, window=5)]),
    ("flowformer::aft_conv", aft_conv_case, [dict()]),
]


def main():
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    DEVICE = parser.parse_args().device
    assert DEVICE == "cpu" or torch.cuda.is_available(), "no GPU"
    for op, run_case, cases in CASES:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(op, DEVICE.upper()):
            print(f"{op}: no {DEVICE.upper()} kernel in this build, nothing to check")
            continue
        for options in cases:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                run_case(options, dtype)
        print(f"{op} ({run_case.__name__}): {len(cases) * 3} cases ran")
    if DEVICE == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
