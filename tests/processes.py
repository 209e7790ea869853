"""Tests that involve another process: how their results are compared, and how children are started.

**Comparing results computed in two processes.** Within one process the same kernels on the same
number of threads give the same bits, and tests compare with ``torch.equal``. Across processes — a
CLI or job subprocess, a Ray worker — the BLAS library may split its sums differently: another
thread count (a Ray worker runs one thread, a subprocess as many as ``OMP_NUM_THREADS`` or the
cores), another code path for the CPU's instruction set, another alignment of the buffers. The last
bits of every sum then differ. Measured on an AVX-512 Xeon (torch's MKL): up to 7e-14 on leave-one-out
parameters of norm ~10 with the multi-secant curvature (its SVD amplifies round-off), 2e-16 with the
authors' own L-BFGS pairs. Such results are compared within

    |a − b| ≤ ACROSS · max(1, max|b|)  element-wise,   ACROSS = 1e-10

which is over a thousand times that round-off, and far below DeltaGrad's own error against exact
retraining in these tests (≥ 1e-7 of the change's effect, itself ≥ 1e-4 of ‖θ‖ for the problems
used, so ≥ 1e-11 · ‖θ‖ — and tests that compare with exact retraining assert it separately). The
decisions a replay takes (explicit steps, fallbacks, failed requests) are still compared exactly.

**Starting children.** A shell's background job (``cmd &``), ``nohup`` and many schedulers start the
suite with SIGINT ignored, and a child inherits that: Python then installs no ``KeyboardInterrupt``
handler, so a test that sends SIGINT would see the command run to the end. :func:`python` gives the
argv of a Python child whose SIGINT is back at its default first (the command itself rightly keeps
SIGINT ignored when it was started so).
"""

from __future__ import annotations

import sys

import torch

ACROSS = 1e-10


def assert_same_across_processes(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """``a`` and ``b``, computed in two processes, agree within :data:`ACROSS` (NaN where NaN)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)}"
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN in different places"
    finite = b.nan_to_num(0.0).abs()
    scale = max(1.0, float(finite.max())) if finite.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=0, atol=ACROSS * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


# in the child, before anything else: SIGINT back to its default, then the real command (exec keeps
# the default disposition, so the new interpreter installs its KeyboardInterrupt handler)
_DEFAULT_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def python(*args: str) -> list[str]:
    """The argv of ``python ARGS`` started with SIGINT at its default disposition, whatever this
    process's is (see the module docstring)."""
    return [sys.executable, "-c", _DEFAULT_SIGINT, *args]
