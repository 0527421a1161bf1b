#!/usr/bin/env python3
"""Static checks of built CUDA code, no GPU needed: reads each binary's sm_90 code with cuobjdump and
checks every kernel against an expectations file (TOML):

    [[kernel]]
    name = "mma_gemm<__nv_bfloat16, false>"  # the kernel's unqualified name in the demangled one; one per kernel
    tensor_cores = true                       # has HMMA instructions
    shared_memory = true                      # uses shared memory (SHARED > 0, LDS/STS/LDSM)
    async_copy = true                         # has cp.async (LDGSTS)
    barriers = true                           # has bar.sync

Every kernel must have no local memory: no register spills (no LDL/STL, LOCAL:0) and no stack frame.
A kernel with no entry, or an entry that matches no kernel, fails the check: a new kernel brings its
expectations. --expectations may be given more than once; --only REGEX checks only the kernels whose
demangled names it finds (the op library's fused kernels among its item kernels). Prints a table of each
kernel's facts (registers, shared bytes, instruction counts); --report FILE also writes it as markdown.

    check_kernels.py --expectations tests/static/simt_samples.toml build/simt/libsimt_samples_sm90.so
    check_kernels.py --expectations tests/static/linear_attention.toml --expectations tests/static/flow_attention.toml \
        --only '^void flowformer::(linear|flow)_attention_kernels::' build/cmake/libflowformer.so

--loops BINARY prints each kernel's largest loop instead (loop_sizes: every instruction in it, and the fewest a
warp issues per iteration) and checks that 0 < fewest <= every.
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ARCH = "sm_90"
ROOT = Path(__file__).resolve().parents[2]
COUNTED = {  # column -> SASS mnemonics (before the first '.')
    "HMMA": {"HMMA"},
    "LDSM": {"LDSM"},
    "LDGSTS": {"LDGSTS"},
    "BAR": {"BAR"},
    "SHFL": {"SHFL"},
    "LDS/STS": {"LDS", "STS"},
    "LDL/STL": {"LDL", "STL"},
}


def find_cuobjdump():
    """cuobjdump from $CUOBJDUMP, PATH, the CUDA toolkit, or the triton wheel (which ships one)."""
    candidates = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump"))
    patterns = [os.path.join(p, "triton/backends/nvidia/bin/cuobjdump") for p in sys.path if p]
    patterns.append(str(ROOT / ".venv/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump"))
    for pattern in patterns:
        candidates.extend(glob.glob(pattern))
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    sys.exit("check_kernels: cuobjdump not found (CUOBJDUMP, PATH, CUDA_HOME/bin, or the triton wheel)")


def run(command):
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), check=True, capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def kernel_facts(cuobjdump, binary):
    """{mangled name: facts} for the binary's sm_90 kernels."""
    facts = {}
    arch = None
    for line in run([cuobjdump, "--dump-resource-usage", binary]).splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif (m := re.match(r"\s*Function (\S+):", line)) and arch == ARCH:
            current = facts.setdefault(m.group(1), {k: 0 for k in COUNTED})
        elif arch == ARCH and "REG:" in line:
            for key, value in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line):
                current[key] = int(value)
    for name, instructions in function_code(cuobjdump, binary).items():
        if name not in facts:
            continue
        for _, mnemonic, _, _ in instructions:
            for column, mnemonics in COUNTED.items():
                if mnemonic in mnemonics:
                    facts[name][column] += 1
    return facts


SASS_LINE = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)(\S*)\s*([^;]*);")
LABEL = re.compile(r"^(\.L_x_\d+):")
TARGET = re.compile(r"0x([0-9a-f]+)|`\((\.L_x_\d+)\)")


def function_code(cuobjdump, binary):
    """{mangled kernel: [(offset, mnemonic, predicated, branch target or None)]} of the sm_90 SASS."""
    code, labels = {}, {}
    arch = name = None
    pending = []
    for line in run([cuobjdump, "-sass", binary]).splitlines():
        if m := re.match(r"\s*code for (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            name = m.group(1) if arch == ARCH else None
            if name is not None:
                code[name], labels[name] = [], {}
            pending = []
        elif name is None:
            continue
        elif m := LABEL.match(line.strip()):
            pending.append(m.group(1))
        elif m := SASS_LINE.match(line):
            offset = int(m.group(1), 16)
            for label in pending:
                labels[name][label] = offset
            pending = []
            target = None
            if m.group(3) == "BRA" and (t := TARGET.search(m.group(5))):
                target = int(t.group(1), 16) if t.group(1) else t.group(2)
            code[name].append((offset, m.group(3), m.group(2) is not None, target))
    for name, instructions in code.items():  # label targets to offsets
        code[name] = [(o, op, pred, labels[name].get(t, t) if isinstance(t, str) else t)
                      for o, op, pred, t in instructions]
    return code


def shortest_iteration(instructions, head, latches):
    """The fewest instructions from the loop's head to a latch (a branch back to it), inclusive, over the
    control flow (branches taken or not, predicated exits falling through; an inner loop's body at least once):
    a lower bound on what a warp issues per iteration."""
    at = {o: i for i, (o, *_rest) in enumerate(instructions)}
    start = at[head]
    distance = {start: 1}
    frontier = [start]
    while frontier:
        following = []
        for i in frontier:
            offset, op, predicated, target = instructions[i]
            if offset in latches:
                return distance[i]
            successors = []
            ends = op in ("EXIT", "RET", "BRA") and not predicated
            if not ends and i + 1 < len(instructions):
                successors.append(i + 1)
            if op == "BRA" and target in at and target != head:
                successors.append(at[target])
            for j in successors:
                if j not in distance:
                    distance[j] = distance[i] + 1
                    following.append(j)
        frontier = following
    return None


def loop_sizes(cuobjdump, binary):
    """{demangled kernel name: (every, fewest)} for the largest loop of each kernel in the sm_90 SASS: the widest
    span from a backward branch's target (the head) to the branch, among those the head reaches again (out-of-line
    code that jumps back is not a loop). `every` counts every instruction in the span once (every path; an inner
    loop that was not unrolled once), `fewest` the fewest a warp issues per iteration (shortest_iteration)."""
    sizes = {}
    for name, instructions in function_code(cuobjdump, binary).items():
        backward = [(t, o) for o, op, _, t in instructions if op == "BRA" and isinstance(t, int) and t < o]
        loops = []
        for head in {t for t, _ in backward}:
            latches = {o for t, o in backward if t == head}
            fewest = shortest_iteration(instructions, head, latches)
            if fewest is not None:
                loops.append((max(latches) - head, head, max(latches), fewest))
        if loops:
            _, head, end, fewest = max(loops)
            sizes[name] = (sum(1 for o, *_rest in instructions if head <= o <= end), fewest)
    readable = demangle(list(sizes))
    return {readable[n]: v for n, v in sizes.items()}


def names_kernel(name, readable):
    """Whether `name` (with its template arguments) is the kernel's name in its demangled `readable` one:
    preceded by a namespace or the return type, so that "causal_k<...>" does not name "noncausal_k<...>"."""
    return re.search(r"(?:^|[\s:])" + re.escape(name), readable) is not None


def problems_of(kernel, facts, expected):
    found = []
    if facts.get("LOCAL", 0) or facts["LDL/STL"]:
        found.append(f"local memory (register spills): LOCAL:{facts.get('LOCAL', 0)}, {facts['LDL/STL']} LDL/STL")
    if facts.get("STACK", 0):
        found.append(f"a stack frame of {facts['STACK']} bytes")
    if expected.get("tensor_cores") and not facts["HMMA"]:
        found.append("no tensor-core instruction (HMMA): it runs on CUDA cores")
    if expected.get("shared_memory") and not (facts.get("SHARED", 0) and (facts["LDS/STS"] or facts["LDSM"])):
        found.append("no shared memory")
    if expected.get("async_copy") and not facts["LDGSTS"]:
        found.append("no cp.async (LDGSTS)")
    if expected.get("barriers") and not facts["BAR"]:
        found.append("no barrier")
    return [f"{kernel}: {p}" for p in found]


def table(rows):
    columns = ["kernel", "REG", "SHARED", "STACK", "LOCAL", *COUNTED]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, facts in rows:
        lines.append("| " + " | ".join([f"`{name}`"] + [str(facts.get(c, 0)) for c in columns[1:]]) + " |")
    return "\n".join(lines)


def check_loops(binaries):
    cuobjdump, bad, count = find_cuobjdump(), [], 0
    for binary in binaries:
        for name, (everything, shortest) in loop_sizes(cuobjdump, binary).items():
            print(f"{everything:6d} {shortest:6d}  {name}")
            count += 1
            if not 0 < shortest <= everything:
                bad.append(name)
    if bad:
        print("loop counts FAILED (an iteration longer than the loop):\n  " +
              "\n  ".join(bad))
        return 1
    print(f"loop counts checked: {count} kernels")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expectations", type=Path, action="append")
    parser.add_argument("--only", type=re.compile, help="check only the kernels whose demangled names match")
    parser.add_argument("--report", type=Path)
    parser.add_argument("--loops", action="store_true", help="print and check the kernels' largest loops")
    parser.add_argument("binaries", nargs="+")
    args = parser.parse_args()
    if args.loops:
        return check_loops(args.binaries)
    if args.expectations is None:
        parser.error("--expectations is required (or --loops)")
    entries = [e for path in args.expectations for e in tomllib.loads(path.read_text())["kernel"]]
    expectations = " / ".join(map(str, args.expectations))
    cuobjdump = find_cuobjdump()
    rows, problems, matched = [], [], set()
    for binary in args.binaries:
        facts = kernel_facts(cuobjdump, binary)
        names = demangle(sorted(facts))
        if args.only:
            names = {m: r for m, r in names.items() if args.only.search(r)}
        if not names:
            problems.append(f"{binary}: no {ARCH} kernel to check (built without sm_90?)")
        for mangled, readable in names.items():
            hits = [i for i, e in enumerate(entries) if names_kernel(e["name"], readable)]
            if len(hits) != 1:
                count = len(hits) if hits else "no"
                problems.append(f"{readable}: {count} matching entries in {expectations}")
                expected = {}
            else:
                matched.add(hits[0])
                expected = entries[hits[0]]
            rows.append((readable, facts[mangled]))
            problems += problems_of(readable, facts[mangled], expected)
    problems += [f"entry {e['name']!r} matches no kernel" for i, e in enumerate(entries) if i not in matched]
    report = table(rows)
    print(report)
    if args.report:
        args.report.write_text(f"Static facts of the {ARCH} code (check_kernels.py)\n\n{report}\n")
    if problems:
        print("\nstatic kernel checks FAILED:\n  " + "\n  ".join(problems))
        return 1
    print(f"\nstatic kernel checks passed: {len(rows)} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
