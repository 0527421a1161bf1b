"""A quick look at flowformer on this machine: `python -m flowformer.demo`.

Runs Flow-Attention (non-causal and causal) against the eager reference implementation of the
spec (the einsum code of the paper's repository, with masks), and reports the error against a
float64 run, the speed of forward + backward, and the memory the causal reference needs that the
op does not. A few tens of seconds on 2 CPU cores; uses the GPU when one is present and the op has
CUDA kernels there.
"""

import argparse

import torch

import flowformer
from flowformer import functional as F
from flowformer import reference as R
from flowformer._measure import forward_backward, time_interleaved_ms


def pick_device(requested: str) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("flowformer::flow_attention", "CUDA")
    return torch.device("cuda" if torch.cuda.is_available() and has_cuda_kernel else "cpu")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--lengths", default="512,2048", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="head size D = M")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    print(f"flowformer {flowformer.__version__} | torch {torch.__version__} | device {device} | "
          f"{torch.get_num_threads()} CPU threads | build {flowformer.build_info()}")
    print(f"B = {args.batch}, H = {args.heads}, D = M = {args.dim}, float32; times are forward + backward\n")
    header = f"{'mode':<10} {'L':>6} {'rel. error':>11} {'flowformer ms':>14} {'reference ms':>13} {'speed-up':>9} "
    header += f"{'reference (L,D,M) tensor':>25}"
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    for L in (int(x) for x in args.lengths.split(",")):
        for causal in (False, True):
            B, H, D = args.batch, args.heads, args.dim
            q, k, v, grad = (torch.randn(B, H, L, D, generator=gen).to(device) for _ in range(4))
            # Padding in the non-causal case: the last quarter of the keys of element 0.
            mask = torch.zeros(B, L, dtype=torch.bool, device=device)
            if not causal:
                mask[0, 3 * L // 4:] = True
            options = dict(causal=causal, key_padding_mask=None if causal else mask)
            out = F.flow_attention(q, k, v, **options)
            expected = R.flow_attention(q.double(), k.double(), v.double(), **options)
            err = ((out.double() - expected).norm() / expected.norm()).item()
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            times = time_interleaved_ms({
                "ours": forward_backward(lambda a, b, c: F.flow_attention(a, b, c, **options), leaves, grad),
                "reference": forward_backward(lambda a, b, c: R.flow_attention(a, b, c, **options), leaves, grad),
            }, device, repeat=args.repeat)
            ours, ref = times["ours"], times["reference"]
            tensor_mib = B * H * L * D * D * 4 / 2**20 if causal else 0.0
            extra = f"{tensor_mib:>21.0f} MiB" if causal else f"{'none':>25}"
            print(f"{'causal' if causal else 'non-causal':<10} {L:>6} {err:>11.1e} {ours:>14.1f} {ref:>13.1f} "
                  f"{ref / ours:>8.1f}x {extra}")
    print("\nThe op never builds the causal reference's (B, H, L, D, M) tensor: its memory is O(L (D + M)).")


if __name__ == "__main__":
    main()
