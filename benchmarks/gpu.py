"""The GPU benchmark: the batched explicit step's throughput against the GPU's matmul peak.

    scripts/gpu_check.sh                    # on a machine with CUDA: tests/gpu, then this, under 8 minutes
    python -m benchmarks.gpu                # this alone, without the wrapper's time limit
    python -m benchmarks.gpu --device cpu   # the same on the CPU (exercises the code paths)

The batched explicit step (``LocalRows.grad_many``: two GEMMs of 2·n·d·B·c flops per step) on an
MNIST-shaped problem (60,000 × 784, 10 classes, B = 32 and 128) in float64, float32 and TF32
(``torch.backends.cuda.matmul.allow_tf32``; CUDA only), and with float32/TF32 difference-form GEMMs
on float64 data, beside the matmul peak measured in the same run (best of several n² products in the
same precision). Each line also checks the step's gradient against the float64 one
(``KERNEL_BOUND``: 1e-5 in float32, 3e-3 in TF32), so a wrong kernel cannot post a fast time.

One JSON line per measurement, each with ``"ok"``, after an ``environment`` line and before a
``summary`` line; the process exits 1 when a line is not ok. Without a CUDA device (and without
``--device cpu``) it prints one line saying so and exits 0.

The correctness checks on the GPU (the replays and a Ray fan-out on CUDA against the CPU, to
tolerances) are tests: ``tests/gpu`` (``pytest tests/gpu -m cuda`` on a machine with CUDA; the same
checks CPU against CPU everywhere). Their options went with them: this command has no ``--parts``,
``--models``, ``--optimizers``, ``--dtypes``, ``--modes``, ``--address`` or ``--driver-process``.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from contextlib import contextmanager

import torch

from deltagrad_ray.core import Dataset, LocalRows, ModelSpec, synthetic_classification

# seconds on one GPU (the wrapper stops the tests and this at 480 s in all)
BUDGET_S = 90


class Report:
    """Prints one JSON line per measurement and remembers which failed."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []

    def emit(self, line: dict) -> None:
        print(json.dumps(_finite(line), allow_nan=False), flush=True)
        if line.get("check") in ("environment", "summary"):
            return
        if line.get("ok"):
            self.passed += 1
        else:
            self.failed.append(_label(line))


def _finite(value):
    """The value with non-finite floats spelled as strings (``"inf"``, ``"nan"``): strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _label(line: dict) -> str:
    keys = ("check", "precision", "B")
    return "/".join(str(line[k]) for k in keys if k in line)


def error_text(e: BaseException) -> str:
    """An exception as one short line for a JSON report."""
    return f"{type(e).__name__}: {e}"[:400]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest ‖a_i − b_i‖/‖b_i‖ over rows (a vector is one row), in float64 on the CPU; inf for NaN."""
    a, b = a.detach().cpu().double().reshape(-1, a.shape[-1]), b.detach().cpu().double().reshape(-1, b.shape[-1])
    if a.shape != b.shape:
        return math.inf
    r = ((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)).max()
    return float(r) if bool(torch.isfinite(r)) else math.inf


def _small(x: float) -> float:
    return float(f"{x:.3g}") if math.isfinite(x) else x  # non-finite: spelled out by Report.emit


@contextmanager
def tf32_matmuls(on: bool):
    """CUDA float32 matmuls in TF32 (``on``) or in float32, restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# -- throughput of the batched explicit step ------------------------------------------------------
PRECISIONS = {  # name → (data dtype, difference-form GEMM dtype, TF32 matmuls, matmul peak it is held against)
    "float64": (torch.float64, None, False, "float64"),
    "float32": (torch.float32, None, False, "float32"),
    "tf32": (torch.float32, None, True, "tf32"),
    "float32-difference": (torch.float64, torch.float32, False, "float32"),
    "tf32-difference": (torch.float64, torch.float32, True, "tf32"),
}
# the step's gradient against the float64 one, at random points near the problem's scale: measured
# on the CPU at 6,000 rows, 1.4e-7 (float32) and 1.8e-9 (float32 difference form); TF32 emulated
# (operands rounded to 10 mantissa bits) 9.4e-5. The bounds leave a factor 30 or more.
KERNEL_BOUND = {"float64": 1e-12, "float32": 1e-5, "tf32": 3e-3, "float32-difference": 1e-6, "tf32-difference": 3e-3}


def _best(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (kernels chosen, buffers allocated)
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(device: str, precision: str, size: int, repeats: int = 5) -> float:
    """GFLOP/s of the best of ``repeats`` size² products in float64, float32 or TF32."""
    dtype = torch.float64 if precision == "float64" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    A = torch.randn(size, size, dtype=dtype, device=device, generator=g)
    B = torch.randn(size, size, dtype=dtype, device=device, generator=g)
    with tf32_matmuls(precision == "tf32"):
        s = _best(lambda: torch.mm(A, B), device, repeats)
    return 2 * size ** 3 / s / 1e9


def _time_step(model, base: Dataset, W: torch.Tensor, w_t: torch.Tensor, device: str, dtype: torch.dtype,
               gemm: torch.dtype | None, tf32: bool, repeats: int) -> tuple[torch.Tensor, float]:
    """(Σ_i ∇ℓ_i(w_b) over all rows (B, p), best seconds of ``repeats`` calls) of the GD explicit step's
    kernel, as :class:`~deltagrad_ray.core.Replay` calls it (no rows removed or added)."""
    rows = LocalRows(model, base.to(dtype=dtype, device=device), len(base), gemm_dtype=gemm)
    Wd, wd = W.to(dtype=dtype, device=device), w_t.to(dtype=dtype, device=device)
    extra = torch.zeros(0, dtype=torch.int64, device=device)
    with tf32_matmuls(tf32):
        G = rows.grad_many(Wd, None, None, extra, wd)
        seconds = _best(lambda: rows.grad_many(Wd, None, None, extra, wd), device, repeats) if repeats else math.nan
    if device == "cuda":
        del rows
        torch.cuda.empty_cache()
    return G, seconds


def run_throughput(device: str, report: Report, rows: int, batch_sizes, precisions, peak_size: int,
                   repeats: int) -> None:
    d, c = 784, 10
    base = synthetic_classification(rows, d, c, seed=0)
    model = ModelSpec("logreg", d, c).build()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peaks: dict[str, float] = {}
    gen = torch.Generator().manual_seed(1)
    w_t = 0.05 * torch.randn(model.p, generator=gen, dtype=torch.float64)
    for B in batch_sizes:
        W = w_t + 0.01 * torch.randn(B, model.p, generator=gen, dtype=torch.float64)
        reference = None
        for precision in precisions:
            dtype, gemm, tf32, peak_of = PRECISIONS[precision]
            if tf32 and device != "cuda":
                continue  # TF32 is a CUDA setting
            line = {"check": "throughput", "device": device, "gpu": name, "precision": precision, "n": rows, "d": d,
                    "classes": c, "B": B}
            try:
                G, seconds = _time_step(model, base, W, w_t, device, dtype, gemm, tf32, repeats)
                if reference is None:
                    reference, _ = _time_step(model, base, W, w_t, device, torch.float64, None, False, 0)
                err = rel(G, reference)
                if peak_of not in peaks:
                    peaks[peak_of] = matmul_peak(device, peak_of, peak_size)
                gflops = 4 * rows * d * B * c / seconds / 1e9
                ok = math.isfinite(gflops) and err <= KERNEL_BOUND[precision]
                line.update({"ms_per_step": round(seconds * 1e3, 3), "explicit_step_gflops": round(gflops, 1),
                             "matmul_peak_gflops": round(peaks[peak_of], 1), "peak_precision": peak_of,
                             "explicit_vs_peak": round(gflops / peaks[peak_of], 3),
                             "rel_error_vs_float64": _small(err), "error_bound": KERNEL_BOUND[precision], "ok": ok})
                if not ok:
                    line["failures"] = [f"gradient off the float64 one by {err:.3g} > {KERNEL_BOUND[precision]:g}"]
            except Exception as e:  # noqa: BLE001
                line.update({"ok": False, "error": error_text(e)})
            report.emit(line)


# -- the command ----------------------------------------------------------------------------------------
def comma_list(allowed):
    """An argparse type: a comma-separated list of the ``allowed`` names."""
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(allowed)}, got {text!r}")
        return items
    return parse


def _ints(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers >= 1, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cuda (default; choose the GPU with CUDA_VISIBLE_DEVICES) or cpu")
    ap.add_argument("--rows", type=int, default=60_000, help="rows of the problem (784 features, 10 classes)")
    ap.add_argument("--batch-sizes", type=_ints, default=[32, 128], help="B, the requests per step")
    ap.add_argument("--precisions", type=comma_list(tuple(PRECISIONS)), default=list(PRECISIONS),
                    help="default all (tf32 ones on cuda only)")
    ap.add_argument("--peak-size", type=int, default=None, help="matmul size of the peak (default 8192 on cuda, 2048)")
    ap.add_argument("--repeats", type=int, default=5, help="timings are the best of this many")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cuda = args.device == "cuda"
    report = Report()
    if cuda and not torch.cuda.is_available():
        report.emit({"check": "environment", "ok": True, "skipped": True,
                     "message": f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False): "
                                "nothing was run; tests/gpu skips its CUDA tests without one, and --device cpu "
                                "runs this benchmark on the CPU"})
        return 0
    env = {"check": "environment", "device": args.device, "torch": torch.__version__, "cuda": torch.version.cuda,
           "ok": True}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update({"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                    "gpus_visible": torch.cuda.device_count()})
    else:
        env["threads"] = torch.get_num_threads()
    report.emit(env)
    t0 = time.perf_counter()
    run_throughput(args.device, report, args.rows, args.batch_sizes, args.precisions,
                   args.peak_size or (8192 if cuda else 2048), args.repeats)
    seconds = round(time.perf_counter() - t0, 1)
    report.emit({"check": "summary", "device": args.device, "passed": report.passed, "failed": len(report.failed),
                 "failed_checks": report.failed, "seconds": seconds, "budget_s": BUDGET_S,
                 "over_budget": cuda and seconds > BUDGET_S, "ok": not report.failed})
    return 1 if report.failed else 0


def _terminated(signum, frame):  # the wrapper's time limit: unwind and exit 124
    raise SystemExit(124)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(main())
