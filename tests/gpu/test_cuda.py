"""The GPU checks on a CUDA device (tests/gpu/checks.py: what is compared, the tolerances and why),
skipped without one. scripts/gpu_check.sh runs them (``pytest tests/gpu -m cuda``); test_cpu.py
runs the same checks CPU against CPU."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.checks import (CORE_CASES, RAY_MODES, child_driver, compare_core, core_failures, ray_failures,
                              ray_of_its_own)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize(("kind", "optimizer", "dtype"), CORE_CASES,
                         ids=[f"{k}-{o}-{str(t).removeprefix('torch.')}" for k, o, t in CORE_CASES])
def test_the_replays_on_cuda_match_the_cpu(kind, optimizer, dtype):
    """Training, exact retraining, deltagrad and deltagrad_batched on cuda against the CPU: 1e-8 in
    float64 with every counter equal, 1e-5 (logistic regression) and 5e-4 (MLP) in float32, and every
    replay on cuda within ERROR_BOUND of exact retraining on cuda."""
    m = compare_core("cuda", kind, optimizer, dtype)
    assert core_failures(m) == [], m


@pytest.fixture(scope="module")
def gpu_ray():
    """A local Ray with one GPU, in a process of its own (this one may be connected to the session's
    cluster, which has none)."""
    with ray_of_its_own(gpus=1) as address:
        yield address


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["gd", "sgd"])
def test_ray_on_one_gpu_from_a_cpu_only_driver(gpu_ray, optimizer):
    """RayBackend with its actors on cuda (replicated and pipeline at 0.5 GPU, data-parallel at 0.25
    GPU per replay and data actor) against the serial CPU backend to 1e-8, no failed request, no
    retry, GPU bundles reserved; the driver, a child process with CUDA_VISIBLE_DEVICES="", never
    initialises CUDA (a GPU tensor leaving an actor would fail there)."""
    rc, lines, err = child_driver(gpu_ray, "cuda", [optimizer], list(RAY_MODES))
    assert [x.get("mode") for x in lines] == list(RAY_MODES), (rc, lines, err[-3000:])
    for x in lines:
        assert ray_failures(x, "cuda") == [], x
        assert x["actor_devices"] == ["cuda"] and x["settings"]["num_gpus"] > 0, x
        assert x["driver_cuda_visible_devices"] == "" and x["driver_cuda_initialized"] is False, x
    assert rc == 0, err[-3000:]
