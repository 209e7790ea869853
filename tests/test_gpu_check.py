"""The GPU benchmark (benchmarks/gpu.py) and its wrapper (scripts/gpu_check.sh) on this machine:
without CUDA the wrapper says so in one line and exits 0; with ``--device cpu`` the benchmark's
throughput lines run on the CPU, so that the code path the GPU run takes is exercised here. The GPU
correctness checks the wrapper also runs are tests of their own: tests/gpu (CPU against CPU in
tests/gpu/test_cpu.py)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _lines(text: str) -> list[dict]:
    return [json.loads(t) for t in text.splitlines() if t.strip()]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_the_script_prints_one_line_saying_so_and_exits_0():
    p = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 0, p.stderr[-2000:]
    (line,) = _lines(p.stdout)
    assert line["ok"] and line["skipped"]
    assert line["message"].startswith("no CUDA device")


def test_throughput_on_the_cpu(capsys):
    rc = gpu.main(["--device", "cpu", "--rows", "2000", "--batch-sizes", "8", "--peak-size", "256", "--repeats", "1"])
    lines = _lines(capsys.readouterr().out)
    assert rc == 0, [x for x in lines if not x["ok"]]
    assert lines[0]["check"] == "environment" and lines[0]["device"] == "cpu"
    throughput = [x for x in lines if x["check"] == "throughput"]
    # TF32 is a CUDA setting: on the CPU only the other three precisions run
    assert [x["precision"] for x in throughput] == ["float64", "float32", "float32-difference"]
    for x in throughput:
        assert x["explicit_step_gflops"] > 0 and x["matmul_peak_gflops"] > 0 and x["ok"], x
    assert throughput[0]["rel_error_vs_float64"] == 0.0
    assert 0 < throughput[1]["rel_error_vs_float64"] <= 1e-4
    summary = lines[-1]
    assert summary["check"] == "summary" and summary["ok"] and summary["passed"] == 3 and summary["failed"] == 0
    assert [x["check"] for x in lines] == ["environment", "throughput", "throughput", "throughput", "summary"]


def test_a_failing_check_is_reported_and_the_exit_status_is_1(capsys, monkeypatch):
    monkeypatch.setitem(gpu.KERNEL_BOUND, "float32", 0.0)  # float32 rounding now counts as a failure
    rc = gpu.main(["--device", "cpu", "--rows", "500", "--batch-sizes", "4", "--precisions", "float64,float32",
                   "--peak-size", "128", "--repeats", "1"])
    lines = _lines(capsys.readouterr().out)
    assert rc == 1
    bad = [x for x in lines if not x["ok"]]
    assert [x["check"] for x in bad] == ["throughput", "summary"]
    assert bad[0]["failures"][0].startswith("gradient off the float64 one by")
    assert bad[1]["failed_checks"] == ["throughput/float32/4"]


def test_bad_options_are_refused_with_what_is_allowed(capsys):
    with pytest.raises(SystemExit):
        gpu.main(["--precisions", "float64,fp8"])
    assert ("expected a comma-separated list of float64, float32, tf32, float32-difference, tf32-difference, "
            "got 'float64,fp8'") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu.main(["--batch-sizes", "32,0"])
    assert "expected a comma-separated list of integers >= 1, got '32,0'" in capsys.readouterr().err
    # the correctness parts moved to tests/gpu: the benchmark has no --parts any more
    with pytest.raises(SystemExit):
        gpu.main(["--parts", "core"])
    assert "unrecognized arguments: --parts core" in capsys.readouterr().err
