"""The GPU check (scripts/gpu_check.sh, benchmarks/gpu.py) on this machine: without CUDA it says
so and exits 0; with ``--device cpu`` its checks run CPU against CPU, so that every code path the
GPU run takes (comparisons, Ray fan-out in three modes, the child driver, the throughput lines) is
exercised here. The GPU run itself needs a machine with CUDA."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu
from tests.processes import ACROSS

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


def test_core_and_throughput_checks_cpu_against_cpu(capsys):
    rc = gpu.main(["--device", "cpu", "--parts", "core,throughput", "--models", "logreg", "--optimizers", "gd,sgd",
                   "--dtypes", "float64", "--rows", "2000", "--batch-sizes", "8", "--peak-size", "256",
                   "--repeats", "1"])
    lines = _lines(capsys.readouterr().out)
    assert rc == 0, [x for x in lines if not x["ok"]]
    core = [x for x in lines if x["check"] == "core"]
    assert [(x["optimizer"], x["dtype"]) for x in core] == [("gd", "float64"), ("sgd", "float64")]
    for x in core:
        # the same computations on the same device: bit for bit
        assert x["training"] == x["exact_retraining"] == x["single"] == x["batched"] == 0.0, x
        assert x["batched_float32_gemm"] == 0.0 and x["counters_equal"], x
        # ... and the replays did something: within 5% of exact retraining, for a change that moves the model
        assert 0 < x["error_ratio_max"] <= 0.05 and x["smallest_change_effect"] > 1e-4, x
    throughput = [x for x in lines if x["check"] == "throughput"]
    # TF32 is a CUDA setting: on the CPU only the other three precisions run
    assert [x["precision"] for x in throughput] == ["float64", "float32", "float32-difference"]
    for x in throughput:
        assert x["explicit_step_gflops"] > 0 and x["matmul_peak_gflops"] > 0 and x["ok"], x
    assert throughput[0]["rel_error_vs_float64"] == 0.0
    assert 0 < throughput[1]["rel_error_vs_float64"] <= 1e-4
    summary = lines[-1]
    assert summary["check"] == "summary" and summary["ok"] and summary["passed"] == 5 and summary["failed"] == 0


def test_a_failing_check_is_reported_and_the_exit_status_is_1(capsys, monkeypatch):
    monkeypatch.setitem(gpu.KERNEL_BOUND, "float32", 0.0)  # float32 rounding now counts as a failure
    rc = gpu.main(["--device", "cpu", "--parts", "throughput", "--rows", "500", "--batch-sizes", "4",
                   "--precisions", "float64,float32", "--peak-size", "128", "--repeats", "1"])
    lines = _lines(capsys.readouterr().out)
    assert rc == 1
    bad = [x for x in lines if not x["ok"]]
    assert [x["check"] for x in bad] == ["throughput", "summary"]
    assert bad[0]["failures"][0].startswith("gradient off the float64 one by")
    assert bad[1]["failed_checks"] == ["throughput/float32/4"]


def test_bad_options_are_refused_with_what_is_allowed(capsys):
    with pytest.raises(SystemExit):
        gpu.main(["--parts", "core,gpu"])
    assert "expected a comma-separated list of core, ray, throughput, got 'core,gpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu.main(["--batch-sizes", "32,0"])
    assert "expected a comma-separated list of integers >= 1, got '32,0'" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_checks_cpu_against_the_serial_backend(ray_cluster, capsys):
    """The three modes from this process (connected to the session's cluster), then the replicated
    mode from a child driver with CUDA hidden, as the GPU run does it."""
    rc = gpu.main(["--device", "cpu", "--parts", "ray", "--optimizers", "gd"])
    lines = _lines(capsys.readouterr().out)
    assert rc == 0, [x for x in lines if not x["ok"]]
    ray_lines = {x["mode"]: x for x in lines if x["check"] == "ray"}
    assert set(ray_lines) == {"replicated", "pipeline", "data-parallel"}
    for x in ray_lines.values():
        assert x["failed_requests"] == 0 and x["retries"] == 0 and x["actor_devices"] == ["cpu"], x
        assert x["counters_equal"] and 0 < x["error_ratio_max"] <= 0.05, x
    # Ray actors are other processes: to round-off (tests/processes.py)
    assert ray_lines["replicated"]["params"] <= ACROSS and ray_lines["pipeline"]["params"] <= ACROSS
    assert ray_lines["data-parallel"]["params"] <= 1e-10  # partial gradients summed in another order
    assert ray_lines["replicated"]["requests"] == 13 and len(ray_lines["data-parallel"]["data_bundles"]) == 2

    rc = gpu.main(["--device", "cpu", "--parts", "ray", "--optimizers", "gd", "--modes", "replicated",
                   "--driver-process", "child", "--address", ray_cluster.address])
    lines = _lines(capsys.readouterr().out)
    assert rc == 0, lines
    (child,) = [x for x in lines if x["check"] == "ray"]
    assert child["ok"] and child["params"] <= ACROSS
    assert child["driver_cuda_visible_devices"] == "" and child["driver_cuda_initialized"] is False
