"""Small CUDA cases of every op that has a CUDA kernel, forward and backward, for compute-sanitizer.

    compute-sanitizer --tool memcheck python tests/sanitizer_cases.py

Exits 0 after running every case; prints which ops have no CUDA kernel (nothing to check for them).
"""

import torch

import flowformer  # noqa: F401

def flow_attention_case(options, dtype):
    B, H, L, D = 2, 3, 150, 16  # several chunks of 64 rows
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.zeros(B, L, dtype=torch.bool, device="cuda")
    mask[1, -5:] = True
    out = torch.ops.flowformer.flow_attention(q, k, v, key_padding_mask=mask, **options)
    out.backward(torch.randn_like(out))


def causal_linear_attention_case(options, dtype):
    B, H, L, D = 2, 3, 150, 16
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    kv0 = torch.randn(B, H, D, D, device="cuda", requires_grad=True)
    z0 = torch.rand(B, H, D, device="cuda", requires_grad=True)
    out, kv, z = torch.ops.flowformer.causal_linear_attention(q, k, v, initial_kv=kv0, initial_z=z0, **options)
    (out.float().sum() + kv.sum() + z.sum()).backward()
    step = torch.ops.flowformer.causal_linear_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], initial_kv=kv,
                                                        initial_z=z, **options)  # a decoding step
    step[0].float().sum().backward()


def linear_attention_case(options, dtype):
    B, H, L, S, D = 2, 3, 150, 300, 16
    q = torch.randn(B, H, L, D, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    mask = torch.zeros(B, S, dtype=torch.bool, device="cuda")
    mask[1, -50:] = True
    out = torch.ops.flowformer.linear_attention(q, k, v, key_padding_mask=mask, **options)
    out.backward(torch.randn_like(out))


def aft_full_case(options, dtype):
    B, L, C = 2, 70, 16
    q, k, v = (torch.randn(B, L, C, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    k.data[1].mul_(60)  # keys of very different magnitudes: some elements take the exact fallback
    w = torch.randn(L, L, device="cuda", dtype=dtype, requires_grad=True)
    torch.ops.flowformer.aft_full(q, k, v, w, **options).float().sum().backward()
    torch.ops.flowformer.aft_simple(q, k, v, causal=options["causal"]).float().sum().backward()


def aft_conv_case(options, dtype):
    q, k, v = (torch.randn(2, 7, 9, 8, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    w = torch.randn(2, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
    torch.ops.flowformer.aft_conv(q, k, v, w).float().sum().backward()


# op -> (function running one case, the options of each case)
CASES = {
    "flowformer::flow_attention": (flow_attention_case, [
        dict(causal=False), dict(causal=True), dict(causal=False, feature_map="elu1", clamp=float("inf")),
    ]),
    "flowformer::causal_linear_attention": (causal_linear_attention_case, [
        dict(), dict(normalize=False, feature_map="relu"),
    ]),
    "flowformer::linear_attention": (linear_attention_case, [dict()]),
    "flowformer::aft_full": (aft_full_case, [dict(causal=False), dict(causal=True), dict(causal=True, window=5)]),
    "flowformer::aft_conv": (aft_conv_case, [dict()]),
}


def main():
    assert torch.cuda.is_available(), "no GPU"
    for op, (run_case, cases) in CASES.items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"):
            print(f"{op}: no CUDA kernel in this build, nothing to check")
            continue
        for options in cases:
            for dtype in (torch.float32, torch.bfloat16):
                run_case(options, dtype)
        print(f"{op}: {len(cases) * 2} cases ran")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
