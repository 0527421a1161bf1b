"""Lower bounds on the fused kernels' time on a GPU (linear attention; Flow-Attention's forwards), from what the SIMT emulator counts them
doing (kernel_counts, built by `make test-simt` in build/simt) and the GPU's constants (hardware.toml).

A block walks its rows in chunks of 64. The emulator runs one block over 2 and over 4 chunks; the difference
is one chunk's work, the rest the block's fixed work. At a shape, each launch's blocks are dealt to the
multiprocessors (the busiest gets ceil(blocks / SMs)), and its time is at least the largest of:
  shared    every shared-memory wavefront (conflicts included) at one a cycle per multiprocessor;
  tensor    the busiest warp scheduler's mma FLOPs at a quarter of the multiprocessor's mma.sync rate;
  dram      the launch's global bytes (the distinct 32-byte sectors each block reads and writes) at the
            measured copy bandwidth.
  issue     with --sass (the kernels' sm_90 build with the feature map fixed to elu + 1): the fewest
            instructions a warp issues per iteration of the kernel's chunk loop (the shortest path through the
            loop's branches: warp-uniform ones, such as the causal triangle's tiles or the split schedule's sums,
            taken the cheap way), at one a cycle per scheduler for each warp that scheduler runs.
Beside the bound, an estimate with every path: the loop's instructions all counted once (branches not taken at
a shape too, inner loops once), at the same rate: not a bound, the "every path" column.
An op's bound is the sum of its launches'; its floor the fewest bytes it must move (each input read once,
each output written once) at that bandwidth. Prints, per op and kernel: counters per chunk, each resource's
cycles per chunk against the chunk's share of the floor (the budget), the binding resource, and the bound as
a percentage of the floor. A bound is not a timing: nothing here ran on a GPU.

    python benchmarks/kernel_bounds.py --counts build/simt/kernel_counts [--sass build/simt/libfused_kernels_bounds_sm90.so]
"""

import argparse
import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 64
ELEMENT_BYTES = {"bf16": 2, "half": 2, "float32": 4}
CUDA_TYPES = {"bf16": "__nv_bfloat16", "half": "__half", "float32": "float"}
SHAPES = {  # name -> (B, H, L, D = M)
    "S1": (8, 16, 8192, 64),
    "BH8": (1, 8, 8192, 64),
}


def run_counts(binary, dtype, head_dim, chunks):
    out = subprocess.run([binary, "--dtype", dtype, "--head-dim", str(head_dim), "--chunks", str(chunks)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["launches"]


def flat(counters):
    """The counts the bound uses, from one block's counters (kernel_counts' JSON)."""
    shared_kinds = ("shared_loads", "shared_stores", "ldmatrix", "cp_async_stores")
    global_kinds = ("global_loads", "global_stores", "cp_async_loads")
    return {
        "ldmatrix_wavefronts": counters["ldmatrix"]["wavefronts"] + counters["ldmatrix"]["extra_wavefronts"],
        "other_wavefronts": sum(counters[k]["wavefronts"] + counters[k]["extra_wavefronts"]
                                for k in shared_kinds if k != "ldmatrix"),
        "conflict_wavefronts": sum(counters[k]["extra_wavefronts"] for k in shared_kinds),
        "shared_wavefronts": sum(counters[k]["wavefronts"] + counters[k]["extra_wavefronts"] for k in shared_kinds),
        "mma": counters["mma_m16n8k16_bf16"] + counters["mma_m16n8k16_f16"] + counters["mma_m16n8k8_tf32"],
        "tensor_flops": sum(counters["tensor_flops_by_scheduler"]),
        "busiest_scheduler_flops": max(counters["tensor_flops_by_scheduler"]),
        "dram_bytes": 32 * (counters["dram_read_sectors"] + counters["dram_write_sectors"]),
        "l2_sectors": sum(counters[k]["sectors"] for k in global_kinds),
        "barriers": counters["barriers"],
        "shuffles": counters["shuffles"],
    }


def per_chunk_counts(binary, dtype, head_dim):
    """{kernel: {"chunk": counts of one chunk, "fixed": the rest of a block's, "tiles": blocks a (sequence,
    head), "tf32": whether its products are tf32, "sites": per-site counts}} from runs of 2 and 4 chunks."""
    two, four = run_counts(binary, dtype, head_dim, 2), run_counts(binary, dtype, head_dim, 4)
    kernels = {}
    for a, b in zip(two, four):
        assert a["kernel"] == b["kernel"], (a["kernel"], b["kernel"])
        fa, fb = flat(a["block0"]), flat(b["block0"])
        chunk = {k: (fb[k] - fa[k]) / 2 for k in fa}
        fixed = {k: fa[k] - 2 * chunk[k] for k in fa}
        kernels[a["kernel"]] = {"chunk": chunk, "fixed": fixed, "tiles": a["grid"][0], "sites": b["sites"],
                                "tf32": a["block0"]["mma_m16n8k8_tf32"] > 0}
    return kernels


def plan(binary, blocks, longest, multiprocessors):
    out = subprocess.run([binary, "--plan", str(blocks), str(longest), str(multiprocessors)], check=True,
                         capture_output=True, text=True).stdout
    return {k: {"segments": v[0], "rows": v[1] or longest} for k, v in json.loads(out).items()}


sys.path.insert(0, str(ROOT / "tests" / "static"))
import check_kernels  # noqa: E402 (the static checks' cuobjdump reader)


def loop_instructions(sass_binary):
    """{demangled kernel: (every instruction of its largest loop, the fewest per iteration)} from the sm_90 SASS."""
    return check_kernels.loop_sizes(check_kernels.find_cuobjdump(), sass_binary)


def ops(shape, dtype, kernels, binary, gpu):
    """[(op, floor bytes, [(kernel, blocks, chunks a block)])] at a shape, as the host schedules them."""
    B, H, L, D = shape
    M = D
    e = ELEMENT_BYTES[dtype]
    row = B * H * L * e
    tiles = kernels["causal_forward"]["tiles"]
    plans = plan(binary, B * H * tiles, L, gpu["multiprocessors"])

    def launches(schedule, names, causal=True):
        """The kernels of a schedule; the causal ones' split adds a pass of the segments' sums first."""
        G, rows = plans[schedule]["segments"], plans[schedule]["rows"]
        names = (["segment_sums"] if causal and G > 1 else []) + names
        return [(n, B * G * H * kernels[n]["tiles"], math.ceil(rows / CHUNK)) for n in names]

    return [
        ("causal forward", row * (2 * D + 2 * M), launches("causal_forward", ["causal_forward"])),
        ("causal backward", row * (4 * D + 3 * M),
         launches("causal_backward", ["causal_query_grads", "causal_key_grads"])),
        ("non-causal forward", row * (2 * D + 2 * M),
         launches("noncausal", ["segment_sums", "state_output"], causal=False)),
        ("Flow-Attention causal forward", row * (2 * D + 2 * M), flow_causal(B, H, L, kernels, binary, gpu)),
        ("Flow-Attention causal backward", row * (4 * D + 3 * M), flow_causal_backward(B, H, L, kernels, binary, gpu)),
        ("Flow-Attention causal forward + backward", row * (6 * D + 5 * M),
         flow_causal(B, H, L, kernels, binary, gpu) + flow_causal_backward(B, H, L, kernels, binary, gpu)),
        ("Flow-Attention non-causal forward", row * (2 * D + 2 * M), flow_noncausal(B, H, L, kernels, binary, gpu)),
        ("Flow-Attention non-causal backward", row * (4 * D + 3 * M),
         flow_noncausal_backward(B, H, L, kernels, binary, gpu)),
        ("Flow-Attention non-causal forward + backward", row * (6 * D + 5 * M),
         flow_noncausal(B, H, L, kernels, binary, gpu) + flow_noncausal_backward(B, H, L, kernels, binary, gpu)),
    ]


# Launches of one kernel named apart by the work they do (the causal forward's passes; their chunk loop is the
# whole kernel's, which holds the output's code too: an over-estimate of their issue slots).
# The non-causal backward's passes: two kernels, each with its pass as a last template argument.
SASS_KERNEL = {"flow_causal_sums": "flow_causal_forward", "flow_causal_state": "flow_causal_forward",
               "flow_causal_key_sums": "flow_causal_key_grads", "flow_causal_chain_competition": "flow_causal_chain",
               "flow_causal_chain_vectors": "flow_causal_chain",
               "flow_query_grads_1": ("flow_query_grads", "false"), "flow_query_grads_2": ("flow_query_grads", "true"),
               "flow_key_grads_1": ("flow_key_grads", "false"), "flow_key_grads_2": ("flow_key_grads", "true")}


def flow_causal(B, H, L, kernels, binary, gpu):
    """Causal Flow-Attention's launches: whole sequences, or its split schedule's five passes over the segments
    (three alike, then the state's and the output's). The scans between them (causal_segments.cuh: each reads
    and writes its columns of the segments' states once, 9 MB at BH8, about 2 us of DRAM) are not counted."""
    tiles = kernels["flow_causal_forward"]["tiles"]
    p = plan(binary, B * H * tiles, L, gpu["multiprocessors"])["flow_causal"]
    names = (["flow_causal_sums"] * 3 + ["flow_causal_state"] if p["segments"] > 1 else []) + ["flow_causal_forward"]
    return [(n, B * p["segments"] * H * tiles, math.ceil(p["rows"] / CHUNK)) for n in names]


def flow_causal_backward(B, H, L, kernels, binary, gpu):
    """Causal Flow-Attention's backward: queries (the forward again, with dg and dq's shares), keys (dv, dc and dk's
    shares), the chain (dq, dk), each split by its own plan: the queries pass after the forward's sums passes, the
    keys pass after its sums walk, the chain after its levels (the competition's, then the vectors' twice). The
    scans between them, a few MB at BH8, are not counted."""
    launches = []
    for name, sums in (("flow_causal_query_grads", ["flow_causal_sums"] * 3 + ["flow_causal_state"]),
                       ("flow_causal_key_grads", ["flow_causal_key_sums"]),
                       ("flow_causal_chain", ["flow_causal_chain_competition"] + ["flow_causal_chain_vectors"] * 2)):
        tiles = kernels[name]["tiles"]
        p = plan(binary, B * H * tiles, L, gpu["multiprocessors"])[name]
        names = (sums if p["segments"] > 1 else []) + [name]
        launches += [(n, B * p["segments"] * H * tiles, math.ceil(p["rows"] / CHUNK)) for n in names]
    return launches


def flow_noncausal(B, H, L, kernels, binary, gpu):
    """Non-causal Flow-Attention's launches (L = S): the column sums three times (Q, K; B: counted as pass 1's,
    which pass 2's does and a row dot more), the keys' pass (with A) and the queries' pass, each split by its own
    plan. The host's ops between them (the segments' sums, a few MB at S1) are not counted."""
    launches = []
    for names, tiles in ((["flow_vector_sums"] * 3, 1), (["flow_key_sums", "flow_query_output"],
                                                          kernels["flow_key_sums"]["tiles"])):
        p = plan(binary, B * H * tiles, L, gpu["multiprocessors"])["flow_noncausal"]
        launches += [(n, B * p["segments"] * H * tiles, math.ceil(p["rows"] / CHUNK)) for n in names]
    return launches


def flow_noncausal_backward(B, H, L, kernels, binary, gpu):
    """Non-causal Flow-Attention's backward launches (L = S): the forward's sums again (its launches but the
    output's), then the four passes (queries, keys, queries, keys), each split by its own plan."""
    sums = [launch for launch in flow_noncausal(B, H, L, kernels, binary, gpu) if launch[0] != "flow_query_output"]
    tiles = kernels["flow_query_grads_1"]["tiles"]
    p = plan(binary, B * H * tiles, L, gpu["multiprocessors"])["flow_noncausal"]
    names = ["flow_query_grads_1", "flow_key_grads_1", "flow_query_grads_2", "flow_key_grads_2"]
    return sums + [(n, B * p["segments"] * H * tiles, math.ceil(p["rows"] / CHUNK)) for n in names]


def kernel_bound(counts, blocks, chunks, gpu, loop):
    """Cycles of the busiest multiprocessor per resource (and DRAM's device-wide), for one launch; loop: (every,
    fewest) instructions of the chunk loop, or None."""
    per_sm = math.ceil(blocks / gpu["multiprocessors"])
    work = {k: counts["fixed"][k] + chunks * counts["chunk"][k] for k in counts["chunk"]}
    rate = gpu["tf32_flops_per_cycle"] if counts["tf32"] else gpu["mma_sync_flops_per_cycle"]
    cycles = {
        "shared": per_sm * work["shared_wavefronts"] / gpu["shared_wavefronts_per_cycle"],
        "tensor": per_sm * work["busiest_scheduler_flops"] / (rate / gpu["schedulers"]),
        "dram": blocks * work["dram_bytes"] / gpu["dram_bytes_per_s"] * gpu["clock_ghz"] * 1e9,
    }
    if loop is not None:  # the busiest scheduler runs per_sm warps of this kernel (4 warps a block)
        every, fewest = (per_sm * chunks * n / gpu["issue_per_cycle_per_scheduler"] for n in loop)
        cycles["issue"] = fewest
        cycles["every_path"] = every
    return cycles, per_sm


def report(kernels, dtype, shapes, binary, gpus, loops):
    lines, results = [], []
    for gpu_key, gpu in gpus.items():
        clock = gpu["clock_ghz"] * 1e9
        for shape_name, shape in shapes.items():
            B, H, L, D = shape
            lines.append(f"\n### {gpu['name']}, {shape_name}: B {B}, H {H}, L {L}, D = M = {D}, {dtype}\n")
            lines.append("| op | kernel | blocks | chunks a block | ldmatrix wf / chunk | other shared wf / chunk "
                         "(conflicts) | mma / chunk | DRAM bytes / chunk | barriers / chunk | budget (cycles / chunk) "
                         "| shared | tensor | issue | dram (cycles / chunk) | every path | binding | bound (µs) | every path (µs) |")
            lines.append("|" + "---|" * 18)
            for op, floor_bytes, launches in ops(shape, dtype, kernels, binary, gpu):
                floor_s = floor_bytes / gpu["dram_bytes_per_s"]
                op_bound_s = op_every_s = 0.0
                busiest_chunks = sum(math.ceil(b / gpu["multiprocessors"]) * c for _, b, c in launches)
                budget = floor_s * clock / busiest_chunks
                for name, blocks, chunks in launches:
                    counts = kernels[name]
                    cycles, per_sm = kernel_bound(counts, blocks, chunks, gpu, loops.get(name))
                    counted = {k: v for k, v in cycles.items() if k != "every_path"}
                    binding = max(counted, key=counted.get)
                    bound_s = counted[binding] / clock
                    every_s = max(bound_s, cycles.get("every_path", 0) / clock)
                    op_bound_s += bound_s
                    op_every_s += every_s
                    c = counts["chunk"]
                    per = {k: v / (per_sm * chunks) for k, v in cycles.items()}
                    issue_text, every_text = (f"{per[k]:.0f}" if k in per else "-" for k in ("issue", "every_path"))
                    lines.append(
                        f"| {op} | {name} | {blocks} | {chunks} | {c['ldmatrix_wavefronts']:.0f} | "
                        f"{c['other_wavefronts']:.0f} ({c['conflict_wavefronts']:.0f}) | {c['mma']:.0f} | "
                        f"{c['dram_bytes']:.0f} | {c['barriers']:.0f} | {budget:.0f} | {per['shared']:.0f} | "
                        f"{per['tensor']:.0f} | {issue_text} | {per['dram']:.0f} | {every_text} | {binding} | "
                        f"{bound_s * 1e6:.1f} | {every_s * 1e6:.1f} |")
                    results.append({"gpu": gpu_key, "shape": shape_name, "op": op, "kernel": name, "blocks": blocks,
                                    "chunks": chunks, "per_chunk": c, "cycles": cycles, "binding": binding,
                                    "bound_us": bound_s * 1e6, "every_path_us": every_s * 1e6})
                percent = 100 * floor_s / op_bound_s
                lines.append(f"| **{op}** | floor {floor_bytes / 1e6:.0f} MB = {floor_s * 1e6:.1f} µs | | | | | | | | | "
                             f"| | | | | | **{op_bound_s * 1e6:.1f} µs: {percent:.0f}% of the floor** | "
                             f"{op_every_s * 1e6:.1f} µs: {100 * floor_s / op_every_s:.0f}% |")
                results.append({"gpu": gpu_key, "shape": shape_name, "op": op, "floor_us": floor_s * 1e6,
                                "bound_us": op_bound_s * 1e6, "percent_of_floor": percent,
                                "every_path_us": op_every_s * 1e6})
            fwd = [r for r in results if r["gpu"] == gpu_key and r["shape"] == shape_name and "percent_of_floor" in r]
            both = next(r for r in fwd if r["op"] == "causal forward"), next(r for r in fwd if r["op"] == "causal backward")
            total_floor = both[0]["floor_us"] + both[1]["floor_us"]
            total = both[0]["bound_us"] + both[1]["bound_us"]
            every = both[0]["every_path_us"] + both[1]["every_path_us"]
            lines.append(f"\nCausal forward + backward: bound {total:.1f} µs against the {total_floor:.1f} µs floor "
                         f"of its 11 tensors: {100 * total_floor / total:.0f}% (every path: {every:.1f} µs, "
                         f"{100 * total_floor / every:.0f}%).")
            results.append({"gpu": gpu_key, "shape": shape_name, "op": "causal forward + backward",
                            "floor_us": total_floor, "bound_us": total, "percent_of_floor": 100 * total_floor / total,
                            "every_path_us": every})
            flow = next(r for r in fwd if r["op"] == "Flow-Attention causal forward")
            lines.append(f"Flow-Attention's causal forward: {flow['bound_us'] / both[0]['bound_us']:.2f}x the bound of "
                         f"linear attention's (every path: {flow['every_path_us'] / both[0]['every_path_us']:.2f}x).")
            flow = next(r for r in fwd if r["op"] == "Flow-Attention non-causal forward")
            linear = next(r for r in fwd if r["op"] == "non-causal forward")
            lines.append(f"Flow-Attention's non-causal forward: {flow['bound_us'] / linear['bound_us']:.2f}x the bound "
                         f"of linear attention's, {flow['percent_of_floor']:.0f}% of the single-pass floor.")
    return "\n".join(lines), results


def conflict_sites(kernels, top=6):
    """The sites with the most extra (conflict) wavefronts in the 4-chunk runs, per kernel."""
    lines = ["\n### Where the bank conflicts are (4-chunk block, extra wavefronts by site)\n",
             "| kernel | site | access | instructions | wavefronts | extra |", "|---|---|---|---|---|---|"]
    for name, k in kernels.items():
        sites = sorted((s for s in k["sites"] if s["extra_wavefronts"]), key=lambda s: -s["extra_wavefronts"])
        for s in sites[:top]:
            where = s["site"].split("kernels/")[-1]
            lines.append(f"| {name} | `{where}` | {s['access']} | {s['instructions']} | {s['wavefronts']} | "
                         f"{s['extra_wavefronts']} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default=str(ROOT / "build/simt/kernel_counts"), help="the kernel_counts binary")
    parser.add_argument("--sass", help="the sm_90 library of the kernels (issue slots from its chunk loops)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(ELEMENT_BYTES))
    parser.add_argument("--out", help="folder for kernel_bounds.md and .json")
    parser.add_argument("--check", action="store_true",
                        help="a quick self-check (the test): D = 32, sanity of every number")
    args = parser.parse_args()
    gpus = tomllib.loads((ROOT / "benchmarks/hardware.toml").read_text())
    head_dim = 32 if args.check else 64
    shapes = {k: (*v[:3], head_dim) for k, v in SHAPES.items()}
    kernels = per_chunk_counts(args.counts, args.dtype, head_dim)
    loops = {}
    if args.sass:
        sizes = loop_instructions(args.sass)
        for name, counts in kernels.items():
            kernel = SASS_KERNEL.get(name, name)
            kernel, last = kernel if isinstance(kernel, tuple) else (kernel, None)
            type_and_dim = f"{kernel}_kernel<{CUDA_TYPES[args.dtype]}, {head_dim}"
            tile = f"{head_dim // counts['tiles']}" + (f", {last}" if last else "")
            names = (f"{type_and_dim}, {tile}>", f"{type_and_dim}>")  # with a value tile or not
            match = [v for k, v in sizes.items() if any(check_kernels.names_kernel(n, k) for n in names)]
            if match:
                loops[name] = match[0]
    text, results = report(kernels, args.dtype, shapes, args.counts, gpus, loops)
    text = ("## Kernel bounds from the emulator's counters (unverified on GPU)\n" + text + "\n" +
            conflict_sites(kernels))
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernel_bounds.md").write_text(text + "\n")
        (out / "kernel_bounds.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.check:
        for name in ("causal_forward", "causal_query_grads", "causal_key_grads", "segment_sums", "state_output",
                     "flow_causal_forward", "flow_causal_sums", "flow_causal_state", "flow_causal_key_sums",
                     "flow_causal_chain_vectors",
                     "flow_key_sums",
                     "flow_query_output", "flow_query_grads_1", "flow_key_grads_1", "flow_query_grads_2",
                     "flow_key_grads_2"):
            chunk = kernels[name]["chunk"]
            assert chunk["mma"] > 0 and chunk["shared_wavefronts"] > 0 and chunk["dram_bytes"] > 0, (name, chunk)
        chunk = kernels["flow_vector_sums"]["chunk"]  # CUDA cores only
        assert chunk["mma"] == 0 and chunk["shared_wavefronts"] > 0 and chunk["dram_bytes"] > 0, chunk
        for r in results:
            if "percent_of_floor" in r:
                assert 0 < r["percent_of_floor"] <= 100.0001, r
        print("kernel_bounds: check passed")


if __name__ == "__main__":
    main()
