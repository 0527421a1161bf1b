"""Time and memory measurements shared by the demo, the benchmarks and the memory tests."""

import ctypes
import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved_ms(fns: dict, device, repeat: int = 5, warmup: int = 1) -> dict:
    """Median time (ms) of each fn in `fns`, calling them round-robin so that every one sees the same
    machine conditions (frequency, other load) over the run. On CUDA: device events on the current
    stream around each call (the device's time, launch gaps within the call included); elsewhere: the
    host clock around each call."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def forward_backward(fn: Callable, inputs, grad_out) -> Callable[[], None]:
    """A closure running fn(*inputs) and its backward with grad_out; inputs must require grad."""
    def run():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad_out)
    return run


def forward_only(fn: Callable, inputs) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            fn(*inputs)
    return run


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def unmap_freed_blocks(threshold: int = 1 << 20) -> None:
    """Has glibc serve every block of `threshold` bytes or more from a mapping of its own, returned to the
    system when freed: what MALLOC_MMAP_THRESHOLD_ does at start-up, for a process already running. Does
    nothing where the C library has no mallopt."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def peak_rss_growth_mib(fn: Callable[[], object]) -> float:
    """How far fn() raises this process's resident memory above where it was (Linux), in MiB.

    The kernel's high-water mark is reset first (/proc/self/clear_refs), so earlier peaks (imports,
    warm-up) do not hide the growth. Run with MALLOC_MMAP_THRESHOLD_ set (or after unmap_freed_blocks())
    so that freed blocks leave the process and the figure counts what is live at once, not what the
    allocator kept.
    """
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024
