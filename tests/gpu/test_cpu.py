"""The GPU checks (tests/gpu/checks.py) CPU against CPU, so that every code path the CUDA run takes —
the comparisons, the Ray fan-out in three modes, the child driver with CUDA hidden, the Ray of the
check's own — is exercised on any machine. The same computations on the same device agree bit for
bit; Ray's actors, other processes, to round-off."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.checks import (CORE_CASES, ERROR_BOUND, RAY_MODES, child_driver, compare_core, compare_ray_mode,
                              core_failures, ray_failures, ray_of_its_own, ray_reference)
from tests.processes import ACROSS


def _core_case(kind, optimizer, dtype):
    # logistic regression in float64 is the quick one; the others run with the slow tests
    marks = () if (kind, dtype) == ("logreg", torch.float64) else (pytest.mark.slow,)
    return pytest.param(kind, optimizer, dtype, marks=marks, id=f"{kind}-{optimizer}-{str(dtype)[6:]}")


@pytest.mark.parametrize(("kind", "optimizer", "dtype"), [_core_case(*c) for c in CORE_CASES])
def test_the_replays_cpu_against_cpu(kind, optimizer, dtype):
    m = compare_core("cpu", kind, optimizer, dtype)
    assert core_failures(m) == [], m
    d = m["diffs"]
    # the same computations on the same device: bit for bit
    assert d["training"] == d["exact_retraining"] == d["single"] == d["batched"] == 0.0, m
    assert ("batched_float32_gemm" in d) == (kind == "logreg" and dtype == torch.float64), m
    assert d.get("batched_float32_gemm", 0.0) == 0.0 and m["counters_equal"], m
    # ... and the replays did something: within the bound of exact retraining, for a change that moves the model
    assert 0 < m["error_ratio_max"] <= ERROR_BOUND[(kind, optimizer)] and m["smallest_change_effect"] > 1e-4, m


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return ray_reference(tmp_path_factory.mktemp("gpu-ray"), "gd")


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(RAY_MODES))
def test_ray_mode_cpu_against_the_serial_backend(ray_cluster, reference, mode):
    """Each mode driven from this process (connected to the session's cluster)."""
    x = compare_ray_mode("cpu", mode, reference)
    assert ray_failures(x, "cpu") == [], x
    assert x["failed_requests"] == 0 and x["retries"] == 0 and x["actor_devices"] == ["cpu"], x
    assert x["counters_equal"] and 0 < x["error_ratio_max"] <= 0.05 and x["requests"] == 13, x
    # Ray actors are other processes: to round-off (tests/processes.py); data-parallel sums the
    # partial gradients in another order
    assert x["params"] <= (1e-10 if mode == "data-parallel" else ACROSS), x
    assert x["settings"]["num_gpus"] == 0 and x["driver_cuda_initialized"] is False, x
    if mode == "data-parallel":
        assert x["data_shards"] == 2 and len(x["data_bundles"]) == 2, x


def _child_checks(rc, lines, err):
    assert rc == 0, err[-3000:]
    (x,) = lines
    assert ray_failures(x, "cpu") == [] and x["mode"] == "replicated" and x["params"] <= ACROSS, x
    assert x["driver_cuda_visible_devices"] == "" and x["driver_cuda_initialized"] is False, x


@pytest.mark.slow
def test_a_child_driver_with_cuda_hidden(ray_cluster):
    """The replicated mode from a child driver with CUDA hidden, as the CUDA run does it."""
    _child_checks(*child_driver(ray_cluster.address, "cpu", ["gd"], ["replicated"]))


@pytest.mark.slow
def test_a_ray_of_its_own_runs_the_actors_of_a_child_driver(ray_cluster):
    """The CUDA run's set-up without a GPU: a local Ray in a process of its own (apart from the
    session's cluster this process is connected to), the driver a child with CUDA hidden."""
    with ray_of_its_own(gpus=0) as address:
        assert address != ray_cluster.address
        _child_checks(*child_driver(address, "cpu", ["gd"], ["replicated"]))
