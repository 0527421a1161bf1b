"""The benchmark scripts run as their docstrings say (on the CPU, at tiny sizes) and write every row they
promise: gpu-check runs them on a GPU lent for minutes, where a broken script costs the whole loan."""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_linear_attention  # noqa: E402
import bench_linear_decode  # noqa: E402

TINY = ["--device", "cpu", "--batch", "1", "--heads", "2", "--dim", "16", "--repeat", "1", "--no-memory"]


def test_linear_attention_benchmark_rows(tmp_path):
    bench_linear_attention.main(bench_linear_attention.SUITE, bench_linear_attention.__doc__,
                                TINY + ["--lengths", "32,48", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "linear_attention.json").read_text())
    rows = {(r["mode"], r["L"], r["impl"]): r for r in result["rows"]}
    modes = ("noncausal", "causal", "causal_unnormalized")
    impls = ["flowformer", "reference", "sdpa"] + (["fla_chunk"] if bench_linear_attention.flash_linear_attention() else [])
    assert set(rows) == {(m, L, i) for m in modes for L in (32, 48) for i in impls}
    for (mode, L, impl), r in rows.items():
        if impl == "sdpa" and mode == "causal_unnormalized":
            assert "normalised" in r["skipped"]
        else:
            assert r["forward_ms"] > 0 and r["forward_backward_ms"] > 0, r
    assert {(s["mode"], s["versus"]) for s in result["speedups"]} >= {(m, "reference") for m in modes}
    assert (tmp_path / "linear_attention.md").read_text().count("| causal_unnormalized |") >= 6


def test_impls_option_keeps_flowformer_and_the_named_peers(tmp_path):
    bench_linear_attention.main(bench_linear_attention.SUITE, bench_linear_attention.__doc__,
                                TINY + ["--lengths", "32", "--modes", "causal", "--impls", "sdpa",
                                        "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "linear_attention.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["flowformer", "sdpa"]


def test_decode_benchmark_rows(tmp_path):
    bench_linear_decode.main(["--device", "cpu", "--batch", "1", "--heads", "2", "--dim", "16", "--steps", "3",
                              "--repeat", "1", "--histories", "8,40", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "linear_decode.json").read_text())["rows"]
    assert [r["history"] for r in rows] == [8, 40]
    for r in rows:
        assert r["flowformer_step_us"] > 0 and r["sdpa_kv_cache_step_us"] > 0
        assert r["state_dtype"] == "float32"


@pytest.mark.parametrize("script", ["bench_flow_attention.py", "bench_aft.py"])
def test_other_benchmarks_take_the_gpu_check_arguments(script, tmp_path):
    # The arguments gpu_check.sh passes, at a tiny size.
    module = __import__(script[:-3])
    module.main(module.SUITE, module.__doc__, TINY + ["--lengths", "32", "--memory-budget-gib", "1",
                                                      "--dtype", "bfloat16", "--out", str(tmp_path)])
    assert json.loads((tmp_path / f"{module.SUITE.name}.json").read_text())["rows"]
