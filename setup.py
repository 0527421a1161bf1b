"""Builds flowformer's op library for the Python package by driving the project's one CMake build.

CMake (CMakeLists.txt) compiles the sources in sources.txt into libflowformer.so, in build/cmake
(FLOWFORMER_BUILD_DIR overrides it); this script configures it, builds the `flowformer` target with
Ninja and copies the library into the package as flowformer/_C.so. A second run with nothing changed
only checks that the build is up to date.

CPU kernels are always built. CUDA kernels are built whenever nvcc is found (no GPU needed), for
the architectures in TORCH_CUDA_ARCH_LIST (default "8.0;9.0"); if they fail to compile, the build
fails. FLOWFORMER_CUDA=0 asks for a CPU-only build explicitly, and a CPU-only torch gets one.
MAX_JOBS or CMAKE_BUILD_PARALLEL_LEVEL sets the number of parallel compile jobs (default: all cores);
CMAKE_ARGS adds options to the CMake configure step.

    pip install --no-build-isolation -e .
"""

import importlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def tool(name, directory_attribute):
    """CMake or Ninja from its pip package where installed (a virtualenv that is not activated has them
    off PATH), else from PATH."""
    try:
        return str(Path(getattr(importlib.import_module(name), directory_attribute)) / name)
    except (ImportError, AttributeError):
        return shutil.which(name)


def cached(build_dir, name):
    """A variable's value in build_dir's CMake cache, or None."""
    cache = build_dir / "CMakeCache.txt"
    if cache.exists():
        for line in cache.read_text().splitlines():
            if line.startswith(name + ":"):
                return line.split("=", 1)[1]
    return None


def jobs():
    for variable in ("MAX_JOBS", "CMAKE_BUILD_PARALLEL_LEVEL"):
        if os.environ.get(variable):
            return os.environ[variable]
    return str(len(os.sched_getaffinity(0)))


class CMakeBuild(build_ext):
    def get_ext_filename(self, fullname):
        # A plain shared library for torch.ops.load_library, not a Python module: no ABI tag in its name.
        return os.path.join(*fullname.split(".")) + ".so"

    def build_extension(self, ext):
        cmake = tool("cmake", "CMAKE_BIN_DIR")
        ninja = tool("ninja", "BIN_DIR")
        if cmake is None or ninja is None:
            sys.exit("flowformer: the build needs CMake and Ninja: pip install 'cmake>=3.28' ninja")
        build_dir = ROOT / os.environ.get("FLOWFORMER_BUILD_DIR", "build/cmake")

        # The Catch2 tests are off unless CMAKE_ARGS turns them on (make build does): a pip build needs
        # no Catch2.
        args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DFLOWFORMER_BUILD_TESTS=OFF"]
        if os.environ.get("FLOWFORMER_CUDA") == "0":
            args.append("-DFLOWFORMER_CUDA=OFF")
        elif torch.version.cuda is None:
            print(f"flowformer: torch {torch.__version__} is a CPU-only build: building WITHOUT CUDA kernels",
                  file=sys.stderr)
            args.append("-DFLOWFORMER_CUDA=OFF")
        else:
            args.append("-DFLOWFORMER_CUDA=AUTO")
        # TORCH_CUDA_ARCH_LIST comes from the environment at each build, as in torch's own extension builds:
        # dropping the cached list makes CMakeLists.txt take it from there again (or its default).
        args.append("-UTORCH_CUDA_ARCH_LIST")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))  # last: they override the defaults above

        # A build directory configured for another torch (another virtualenv) caches that torch's paths
        # (Torch_DIR, Caffe2_DIR, ...): start its cache afresh rather than build against the wrong one.
        torch_dir = Path(torch.utils.cmake_prefix_path) / "Torch"
        previous_torch = cached(build_dir, "Torch_DIR")
        if previous_torch is not None and Path(previous_torch) != torch_dir:
            (build_dir / "CMakeCache.txt").unlink()
        if not (build_dir / "CMakeCache.txt").exists():  # the first configure fixes the generator
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        # Configuring again each time (about a second) picks up changed settings: FLOWFORMER_CUDA,
        # TORCH_CUDA_ARCH_LIST, CMAKE_ARGS.
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--target", "flowformer", "-j", jobs()], check=True)

        library = Path(self.get_ext_fullpath(ext.name))
        library.parent.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(build_dir / "libflowformer.so"), str(library))


setup(
    ext_modules=[Extension("flowformer._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    # The library uses no Python API at all: one wheel serves every Python version.
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
