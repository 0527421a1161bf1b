"""The compute-sanitizer cases of gpu-check (tests/sanitizer_cases.py) stay runnable: a dry run of them on
the CPU, through the CUDA kernels in the SIMT emulator."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "sanitizer_cases.py"


def test_sanitizer_cases_dry_run_on_cpu():
    env = dict(os.environ, FLOWFORMER_EMULATE_CUDA="1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "packed_linear_attention_case" in result.stdout and "no CPU kernel" not in result.stdout
