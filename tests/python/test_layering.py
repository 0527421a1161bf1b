"""The layering of the sources, by a scan of the files: no build needed (`--noconftest` runs it without
one).

kernels/ holds the torch-free item code, compiled by nvcc for the GPU and by the host compiler for the
CPU; csrc/ holds everything that touches torch (tensors, the dispatcher, ATen, c10) and includes kernels/,
never the other way round. sources.txt is the one list of sources of setup.py and CMakeLists.txt.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC, KERNELS = ROOT / "csrc", ROOT / "kernels"
# The include directories of setup.py and CMakeLists.txt, in their search order.
INCLUDE_DIRS = (CSRC, CSRC / "include", KERNELS)
TORCH_HEADERS = ("ATen/", "c10/", "torch/")
INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.MULTILINE)
SOURCE_SUFFIXES = (".cpp", ".cu")


def kernel_files():
    return sorted(p for p in KERNELS.rglob("*") if p.is_file())


def includes(path):
    """(quoted, name) for each #include of the file."""
    return [(m.group(1) == '"', m.group(2)) for m in INCLUDE.finditer(path.read_text(errors="replace"))]


def csrc_headers(path, quoted, name):
    """The files under csrc/ that an include of `path` may resolve to (its own folder first when quoted,
    then the include directories): a header that exists in both trees resolves to csrc/'s copy."""
    candidates = ([path.parent / name] if quoted else []) + [d / name for d in INCLUDE_DIRS]
    found = [c.resolve() for c in candidates if c.is_file()]
    return [c for c in found if c.is_relative_to(CSRC.resolve())]


def listed_sources():
    lines = (ROOT / "sources.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_kernels_exist():
    assert kernel_files(), "kernels/ is empty: the scan below would pass vacuously"


def test_kernels_include_no_torch_header():
    bad = [f"{p.relative_to(ROOT)}: #include {name}" for p in kernel_files() for _, name in includes(p)
           if name.startswith(TORCH_HEADERS)]
    assert not bad, "kernels/ must stay torch-free (move the tensor code to csrc/):\n" + "\n".join(bad)


def test_kernels_include_no_csrc_header():
    bad = [f"{p.relative_to(ROOT)}: #include {name} -> {h.relative_to(ROOT.resolve())}"
           for p in kernel_files() for quoted, name in includes(p) for h in csrc_headers(p, quoted, name)]
    assert not bad, "kernels/ must not include csrc/ headers:\n" + "\n".join(bad)


def test_listed_sources_exist():
    missing = [s for s in listed_sources() if not (ROOT / s).is_file()]
    assert not missing, f"sources.txt lists files that do not exist: {missing}"


def test_every_source_is_listed():
    listed = set(listed_sources())
    unlisted = sorted(str(p.relative_to(ROOT)) for tree in (CSRC, KERNELS) for p in tree.rglob("*")
                      if p.suffix in SOURCE_SUFFIXES and str(p.relative_to(ROOT)) not in listed)
    assert not unlisted, f"sources in csrc/ or kernels/ that sources.txt does not list (never built): {unlisted}"



def test_no_header_in_both_trees():
    # An include names a path relative to the include directories: a path present under csrc/ and under
    # kernels/ would resolve to csrc/'s copy everywhere.
    def headers(tree):
        return {p.relative_to(tree) for p in tree.rglob("*") if p.is_file() and p.suffix not in SOURCE_SUFFIXES}

    both = sorted(str(p) for p in headers(KERNELS) & (headers(CSRC) | headers(CSRC / "include")))
    assert not both, f"headers present under both csrc/ and kernels/: {both}"
