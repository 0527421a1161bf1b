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
expectations. Prints a table of each kernel's facts (registers, shared bytes, instruction counts);
--report FILE also writes it as markdown.

    check_kernels.py --expectations tests/static/simt_samples.toml build/simt/libsimt_samples_sm90.so
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
INSTRUCTION = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")  # offset, predicate, mnemonic
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
    arch = name = None
    for line in run([cuobjdump, "-sass", binary]).splitlines():
        if m := re.match(r"\s*code for (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            name = m.group(1)
        elif arch == ARCH and name in facts and (m := INSTRUCTION.match(line)):
            for column, mnemonics in COUNTED.items():
                if m.group(1) in mnemonics:
                    facts[name][column] += 1
    return facts


BRANCH = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?BRA\b[^;]*?(?:0x([0-9a-f]+)|`\((\.L_x_\d+)\))")
LABEL = re.compile(r"^(\.L_x_\d+):")
OFFSET = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+\S")


def loop_sizes(cuobjdump, binary):
    """{demangled kernel name: instructions of its largest loop} in the sm_90 SASS: the widest span from a
    backward branch's target to the branch, every instruction in it counted once (all paths; an inner loop
    that was not unrolled counts once too)."""
    spans, labels, offsets = {}, {}, {}
    arch = name = None
    pending = []
    for line in run([cuobjdump, "-sass", binary]).splitlines():
        if m := re.match(r"\s*code for (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            name = m.group(1) if arch == ARCH else None
            labels, pending = {}, []
            offsets[name] = []
        elif name is None:
            continue
        elif m := LABEL.match(line.strip()):
            pending.append(m.group(1))
        elif m := OFFSET.match(line):
            offset = int(m.group(1), 16)
            for label in pending:
                labels[label] = offset
            pending = []
            offsets[name].append(offset)
            if b := BRANCH.match(line):
                target = int(b.group(2), 16) if b.group(2) else labels.get(b.group(3))
                if target is not None and target < offset:
                    spans.setdefault(name, []).append((target, offset))
    sizes = {}
    for name, loops in spans.items():
        sizes[name] = max(sum(1 for o in offsets[name] if start <= o <= end) for start, end in loops)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expectations", required=True, type=Path)
    parser.add_argument("--report", type=Path)
    parser.add_argument("binaries", nargs="+")
    args = parser.parse_args()
    entries = tomllib.loads(args.expectations.read_text())["kernel"]
    cuobjdump = find_cuobjdump()
    rows, problems, matched = [], [], set()
    for binary in args.binaries:
        facts = kernel_facts(cuobjdump, binary)
        if not facts:
            problems.append(f"{binary}: no {ARCH} kernel found (built without sm_90?)")
        names = demangle(sorted(facts))
        for mangled, readable in names.items():
            hits = [i for i, e in enumerate(entries) if names_kernel(e["name"], readable)]
            if len(hits) != 1:
                count = len(hits) if hits else "no"
                problems.append(f"{readable}: {count} matching entries in {args.expectations}")
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
