"""Benchmark autoregressive decoding with causal linear attention: the time of one decoding step (L = 1,
the recurrent state in and out) after histories of different lengths, against softmax attention's
decoding step (torch's scaled_dot_product_attention on a key/value cache holding the history). The
state is (B, H, D, M) whatever the history, so flowformer's step time should not depend on it; the
cache's step reads the whole history. The states come from a prefill over the history (flowformer's
own forward); each timing is a loop of --steps consecutive steps (each feeding the next its state),
median over --repeat loops, divided by the steps. Writes <out>/linear_decode.json and .md with the
device, torch version and commit.

    python benchmarks/bench_linear_decode.py --device cpu --histories 1024,16384 --out benchmarks/results/cpu
"""

import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as TF

import flowformer
from flowformer import functional as F
from flowformer._measure import time_interleaved_ms
from harness import argument_parser, commit, device_name


def random(shape, gen, device, dtype):
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def decode_loops(args, history, device, dtype):
    """Two closures, each running args.steps decoding steps after `history` positions: flowformer's
    (state in, state out) and softmax attention's (a cache of history + steps positions, filled as it goes)."""
    B, H, D, S = args.batch, args.heads, args.dim, args.steps
    gen = torch.Generator().manual_seed(history)
    with torch.no_grad():
        prefix = [random((B, H, history, D), gen, device, dtype) for _ in range(3)]
        _, kv0, z0 = F.causal_linear_attention(*prefix)
        cache_k = torch.cat([prefix[1], random((B, H, S, D), gen, device, dtype)], dim=2)
        cache_v = torch.cat([prefix[2], random((B, H, S, D), gen, device, dtype)], dim=2)
        del prefix
    q, k, v = (random((S, B, H, 1, D), gen, device, dtype) for _ in range(3))

    @torch.no_grad()
    def linear():
        kv, z = kv0, z0
        for t in range(S):
            _, kv, z = F.causal_linear_attention(q[t], k[t], v[t], initial_kv=kv, initial_z=z)

    @torch.no_grad()
    def softmax():
        for t in range(S):
            end = history + t + 1
            cache_k[:, :, end - 1:end].copy_(k[t])
            cache_v[:, :, end - 1:end].copy_(v[t])
            TF.scaled_dot_product_attention(q[t], cache_k[:, :, :end], cache_v[:, :, :end])

    return {"flowformer": linear, "sdpa_kv_cache": softmax}, kv0


def main(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument("--histories", default="1024,16384")
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    meta = {"device": device_name(device), "torch": torch.__version__, "flowformer": flowformer.__version__,
            "commit": commit(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "dtype": args.dtype, "batch": args.batch, "heads": args.heads, "dim": args.dim, "steps": args.steps,
            "repeat": args.repeat}
    rows = []
    for history in (int(h) for h in args.histories.split(",")):
        loops, state = decode_loops(args, history, device, dtype)
        loop_ms = time_interleaved_ms(loops, device, args.repeat)
        row = {"history": history, "state_dtype": str(state.dtype).replace("torch.", "")}
        row.update({f"{name}_step_us": ms * 1e3 / args.steps for name, ms in loop_ms.items()})
        print(json.dumps(row), flush=True)
        rows.append(row)
    first = rows[0]["flowformer_step_us"]
    lines = [f"# linear attention decoding step: {meta['device']}", "",
             f"torch {meta['torch']}, commit {meta['commit']}, {meta['date']}, dtype {meta['dtype']}, "
             f"B = {args.batch}, H = {args.heads}, D = M = {args.dim}; {args.steps} steps a loop, median of "
             f"{args.repeat} loops", "",
             "| history | flowformer step µs | vs. shortest history | SDPA + KV cache step µs | SDPA / flowformer |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['history']} | {r['flowformer_step_us']:.1f} | {r['flowformer_step_us'] / first:.2f} | "
                     f"{r['sdpa_kv_cache_step_us']:.1f} | {r['sdpa_kv_cache_step_us'] / r['flowformer_step_us']:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear_decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / "linear_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
