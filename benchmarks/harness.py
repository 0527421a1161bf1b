"""The benchmark harness shared by the per-op scripts (bench_*.py): each defines a Suite (its modes,
implementations, inputs and the fewest bytes the op must move) and calls main(suite).

For each mode and sequence length: median time (implementations called round-robin, so they share
the machine's conditions) of the forward and of the forward + backward of every implementation, the
peak memory of forward + backward (CUDA: max_memory_allocated; CPU: peak RSS growth of a fresh
process), and on CUDA flowformer's achieved bandwidth on the fewest bytes it must move as a fraction
of the measured device-to-device copy bandwidth. Writes <out>/<name>.json, .md and .png with the
device, torch version and commit.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

import flowformer
from flowformer._measure import forward_backward, forward_only, peak_rss_growth_mib, time_interleaved_ms

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Suite:
    name: str                   # the op; names the output files
    modes: Dict[str, Any]       # mode name -> the mode (causal: bool, or the suite's own mode object)
    make_impls: Callable        # (compile_reference: bool) -> {impl name: fn(q, k, v, mode) -> Tensor}
    min_bytes: Callable         # (args, L, itemsize, backward: bool) -> bytes flowformer must move
    reference_bytes: Callable   # (args, L, mode, itemsize) -> bytes the eager reference holds at once
    description: str = ""
    inputs: Optional[Callable] = None  # (args, L, device, dtype, requires_grad) -> (inputs, grad); else qkv()
    skip: Optional[Callable] = None    # (impl name, mode) -> why it does not run in that mode, or None


def make_inputs(suite, args, L, device, dtype, requires_grad):
    return (suite.inputs or qkv)(args, L, device, dtype, requires_grad)


def qkv(args, L, device, dtype, requires_grad):
    """q, k, v (B, H, L, D) as views of (B, L, H, D) tensors (the layout of a model's projections, and
    that of flash-linear-attention), and a gradient for the output."""
    gen = torch.Generator().manual_seed(L)
    shape = (args.batch, L, args.heads, args.dim)
    ts = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
          .requires_grad_(requires_grad) for _ in range(3)]
    grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    return ts, grad


def copy_bandwidth_gbs(device, nbytes=1 << 30, repeat=10):
    """Measured device-to-device copy bandwidth (GB/s, bytes read + written): the roofline's memory side."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_interleaved_ms({"copy": lambda: dst.copy_(src)}, device, repeat)["copy"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_memory_cuda(fn, ts, grad, setting):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*ts, setting).backward(grad)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_memory_cpu(args, impl, mode, L):
    """Peak RSS growth (MiB) of forward + backward, in a fresh process so earlier runs do not count."""
    cmd = [sys.executable, sys.argv[0], "--measure-memory", impl, mode, str(L), "--batch", str(args.batch),
           "--heads", str(args.heads), "--dim", str(args.dim), "--dtype", args.dtype]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return float(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else None


def memory_child(suite, args):
    impl, mode, L = args.measure_memory[0], args.measure_memory[1], int(args.measure_memory[2])
    dtype = getattr(torch, args.dtype)
    fn = suite.make_impls(False)[impl]
    setting = suite.modes[mode]
    small, small_grad = make_inputs(suite, args, 8, "cpu", dtype, True)
    fn(*small, setting).backward(small_grad)  # one-time initialisation
    ts, grad = make_inputs(suite, args, L, "cpu", dtype, True)
    print(peak_rss_growth_mib(lambda: fn(*ts, setting).backward(grad)))


def commit():
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def run(suite, args):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    impls = suite.make_impls(args.compile)
    if args.impls:
        impls = {name: fn for name, fn in impls.items() if name in args.impls.split(",") or name == "flowformer"}
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        f"flowformer::{suite.name}", "CUDA" if device.type == "cuda" else "CPU")
    budget = args.memory_budget_gib * 2**30
    bandwidth = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    rows = []
    for mode in args.modes.split(","):
        setting = suite.modes[mode]
        for L in (int(x) for x in args.lengths.split(",")):
            ts, grad = make_inputs(suite, args, L, device, dtype, True)
            runnable, skipped = {}, {}
            for impl, fn in impls.items():
                reason = suite.skip and suite.skip(impl, setting)
                if impl == "flowformer" and not has_kernel:
                    skipped[impl] = f"no {device.type} kernel in this build"
                elif reason:
                    skipped[impl] = reason
                elif impl.startswith("reference") and suite.reference_bytes(args, L, setting, itemsize) > budget:
                    skipped[impl] = "reference does not fit the memory budget"
                else:
                    runnable[impl] = lambda *xs, f=fn: f(*xs, setting)
            try:
                forward = time_interleaved_ms({n: forward_only(f, ts) for n, f in runnable.items()}, device,
                                              args.repeat)
                both = time_interleaved_ms({n: forward_backward(f, ts, grad) for n, f in runnable.items()},
                                           device, args.repeat)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                skipped.update({n: "out of memory" for n in runnable})
                runnable = {}
            for impl in impls:
                row = {"mode": mode, "L": L, "impl": impl}
                if impl in skipped:
                    row["skipped"] = skipped[impl]
                else:
                    row["forward_ms"] = forward[impl]
                    row["forward_backward_ms"] = both[impl]
                    if device.type == "cuda":
                        row["peak_memory_mib"] = measure_memory_cuda(impls[impl], ts, grad, setting)
                    elif args.memory:
                        row["peak_memory_mib"] = measure_memory_cpu(args, impl, mode, L)
                    if bandwidth and impl == "flowformer":
                        for key, backward in (("forward", False), ("forward_backward", True)):
                            gbs = suite.min_bytes(args, L, itemsize, backward) / (row[f"{key}_ms"] * 1e-3) / 1e9
                            row[f"{key}_roofline_fraction"] = gbs / bandwidth
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows, bandwidth


def ratios(rows):
    """flowformer's speed-up over each other implementation, per mode and L (same run)."""
    table = {}
    for r in rows:
        table.setdefault((r["mode"], r["L"]), {})[r["impl"]] = r
    out = []
    for (mode, L), by_impl in table.items():
        ours = by_impl.get("flowformer", {})
        for impl, r in by_impl.items():
            if impl == "flowformer" or "forward_backward_ms" not in r or "forward_backward_ms" not in ours:
                continue
            entry = {"mode": mode, "L": L, "versus": impl,
                     "forward_speedup": r["forward_ms"] / ours["forward_ms"],
                     "forward_backward_speedup": r["forward_backward_ms"] / ours["forward_backward_ms"]}
            if r.get("peak_memory_mib") and ours.get("peak_memory_mib"):
                entry["memory_ratio"] = r["peak_memory_mib"] / max(ours["peak_memory_mib"], 1e-3)
            out.append(entry)
    return out


def write_markdown(path, suite, meta, rows, speedups):
    lines = [f"# {suite.name} benchmark: {meta['device']}", "",
             f"torch {meta['torch']}, commit {meta['commit']}, {meta['date']}, dtype {meta['dtype']}, "
             f"B = {meta['batch']}, H = {meta['heads']}, D = M = {meta['dim']}", ""]
    if suite.description:
        lines += [suite.description, ""]
    lines += ["| mode | L | implementation | forward ms | forward+backward ms | peak memory MiB |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['mode']} | {r['L']} | {r['impl']} | {r['skipped']} | | |")
            continue
        mem = r.get("peak_memory_mib")
        lines.append(f"| {r['mode']} | {r['L']} | {r['impl']} | {r['forward_ms']:.2f} | "
                     f"{r['forward_backward_ms']:.2f} | {'' if mem is None else f'{mem:.0f}'} |")
    if meta.get("copy_bandwidth_gbs"):
        lines += ["", f"Roofline: measured device-to-device copy bandwidth {meta['copy_bandwidth_gbs']:.0f} GB/s; "
                  "flowformer's achieved bandwidth on the fewest bytes it must move (inputs read once, outputs "
                  "written once), as a fraction of it:", "", "| mode | L | forward | forward+backward |",
                  "|---|---|---|---|"]
        for r in rows:
            if "forward_roofline_fraction" in r:
                lines.append(f"| {r['mode']} | {r['L']} | {r['forward_roofline_fraction']:.1%} | "
                             f"{r['forward_backward_roofline_fraction']:.1%} |")
    lines += ["", "flowformer's speed-up (x) and memory ratio over each implementation, same run:", "",
              "| mode | L | versus | forward | forward+backward | peak memory ratio |", "|---|---|---|---|---|---|"]
    for s in speedups:
        mem = s.get("memory_ratio")
        lines.append(f"| {s['mode']} | {s['L']} | {s['versus']} | {s['forward_speedup']:.2f} | "
                     f"{s['forward_backward_speedup']:.2f} | {'' if mem is None else f'{mem:.1f}'} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path, suite, meta, rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for impl in sorted({r["impl"] for r in rows}):
            pts = [(r["L"], r["forward_backward_ms"]) for r in rows
                   if r["mode"] == mode and r["impl"] == impl and "forward_backward_ms" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel="forward + backward (ms)",
               title=f"{mode}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{suite.name}, {meta['device']}, {meta['dtype']}, B={meta['batch']} H={meta['heads']} "
                 f"D=M={meta['dim']} (torch {meta['torch']}, {meta['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def argument_parser(doc):
    """The arguments every benchmark takes: where, in which dtype, the shape, repeats, and the output folder."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64, help="D = M")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/local")
    return parser


def main(suite, doc, argv=None):
    parser = argument_parser(doc)
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--modes", default=",".join(suite.modes))
    parser.add_argument("--compile", action="store_true", help="also time the reference under torch.compile")
    parser.add_argument("--impls", help="only these implementations besides flowformer (comma-separated names)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip CPU memory measurement")
    parser.add_argument("--memory-budget-gib", type=float, default=8.0,
                        help="skip the reference where its tensors alone would exceed this")
    parser.add_argument("--measure-memory", nargs=3, metavar=("IMPL", "MODE", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_memory:
        memory_child(suite, args)
        return
    device = torch.device(args.device)
    meta = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "flowformer": flowformer.__version__, "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "dtype": args.dtype, "batch": args.batch, "heads": args.heads, "dim": args.dim,
            "repeat": args.repeat, "build": flowformer.build_info()}
    rows, meta["copy_bandwidth_gbs"] = run(suite, args)
    speedups = ratios(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{suite.name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "speedups": speedups},
                                                       indent=1) + "\n")
    write_markdown(out / f"{suite.name}.md", suite, meta, rows, speedups)
    write_plot(out / f"{suite.name}.png", suite, meta, rows)
    print((out / f"{suite.name}.md").read_text())
