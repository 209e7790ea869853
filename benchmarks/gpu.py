"""The GPU check: the replays on CUDA against the CPU, a Ray fan-out on one GPU driven from a
CPU-only process, and the explicit step's throughput against the GPU's matmul peak.

    scripts/gpu_check.sh                    # on a machine with CUDA: all three parts, under 8 minutes
    python -m benchmarks.gpu                # the same without the wrapper's time limit
    python -m benchmarks.gpu --device cpu   # every check CPU against CPU (exercises the code paths)

One JSON line per check, each with ``"ok"``; the process exits 1 when a check fails. Without a CUDA
device (and without ``--device cpu``) it prints one line saying so and exits 0.

1. ``core`` — logistic regression and a ReLU MLP, GD and SGD, float64 and float32, four change sets
   (8 and 80 rows deleted, 40 added, 40 deleted with 20 added): training, exact retraining, the
   single-request replay (``deltagrad``) and the batched replay (``deltagrad_batched``, B = 2, two
   batches per pass; also with float32 difference-form GEMMs for float64 logistic regression) on
   the device, each compared with the same computation on the CPU.
2. ``ray`` — ``RayBackend(workers=2, num_gpus=0.5, device="cuda")`` in replicated and pipeline mode,
   and in data-parallel mode (two replay actors and two data actors at 0.25 GPU each, the data
   actors reserving GPUs too), against the serial backend on the CPU, GD and SGD, float64. This
   process starts a local Ray with one GPU and runs the driver in a child process with
   ``CUDA_VISIBLE_DEVICES=""`` (as on a CPU-only head node): the driver must never initialise
   CUDA, so a GPU tensor leaving an actor fails the check.
3. ``throughput`` — the batched explicit step (``LocalRows.grad_many``: two GEMMs of 2·n·d·B·c
   flops per step) on an MNIST-shaped problem (60,000 × 784, 10 classes, B = 32 and 128) in float64,
   float32 and TF32 (``torch.backends.cuda.matmul.allow_tf32``), and with float32/TF32
   difference-form GEMMs on float64 data, beside the matmul peak measured in the same run (best
   of several n² products in the same precision). Each line also checks the step's gradient against
   the float64 one (``KERNEL_BOUND``: 1e-5 in float32, 3e-3 in TF32).

Tolerances (relative, ‖a − b‖/‖b‖ per request, the largest over requests):

* float64: **1e-8** (and every counter equal). The devices sum in other orders (cuBLAS and the
  CPU BLAS block their reductions differently), so results differ by rounding only. Scaling the
  float32 differences below by the ratio of the two unit roundoffs (2⁻⁵³/2⁻²⁴ ≈ 2e-9) predicts
  at most ~5e-14 with the compact L-BFGS model; the multi-secant model (the default for GD logistic
  regression) inverts its pairs down to singular values 1e-6 of the largest, which amplifies
  round-off up to ~1e6× (measured ≤ 5e-11 between summation orders on the CPU), so 1e-8 leaves a
  factor 200, and the replays' decisions (explicit or approximate step, pair skipped) sit far from
  their thresholds at that level. Anything a device
  bug does — a tensor left on the wrong device, a row missed, a correction dropped — moves the
  result by the change's own effect, 7e-4 to 2e-2 of ‖θ‖ here.
* float32: **1e-5** for logistic regression, **5e-4** for the MLP. On the CPU, the float32 result of
  each computation differs from the float64 one by at most 2.4e-7 (logistic regression) and
  2.4e-5 (the MLP, whose training amplifies perturbations; SGD replay); two float32 computations
  that round differently differ by about √2 times that, and the tolerances leave a factor 10 or
  more on top. Counters are reported, not required.
* Ray: **1e-8** against the serial CPU backend (as float64 above), no request failed, no retry.

Every replay is also compared with exact retraining on the device (‖θ_DG − θ_exact‖ ≤ bound ×
‖θ_exact − θ_full‖, the bounds of ``tests/core/test_replay.py``), so a check also fails if the
replay did nothing on either device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib.metadata import version

import torch

from deltagrad_ray.core import (ChangeSet, Dataset, InMemory, LocalRows, ModelSpec, Trajectory, deltagrad,
                                deltagrad_batched, learning_rates, make_change_set, relative_error, retrain,
                                synthetic_classification, train)

ROOT = pathlib.Path(__file__).resolve().parents[1]
# float32: see the module docstring (the MLP amplifies rounding differences 100× more than logistic regression)
TOLERANCE = {("logreg", torch.float64): 1e-8, ("mlp", torch.float64): 1e-8,
             ("logreg", torch.float32): 1e-5, ("mlp", torch.float32): 5e-4}
RAY_TOLERANCE = 1e-8
# DeltaGrad against exact retraining (tests/core/test_replay.py: 5% of the change's effect for the
# convex model; the ReLU MLP, with no such guarantee, 15% under GD and 30% under SGD)
ERROR_BOUND = {("logreg", "gd"): 0.05, ("logreg", "sgd"): 0.05, ("mlp", "gd"): 0.15, ("mlp", "sgd"): 0.3}
# seconds per part on one GPU (the wrapper stops everything at 480 s)
BUDGET_S = {"core": 180, "ray": 180, "throughput": 90}
PARTS = ("core", "ray", "throughput")
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class Report:
    """Prints one JSON line per check and remembers which failed."""

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
    keys = ("check", "model", "optimizer", "dtype", "mode", "precision", "B")
    return "/".join(str(line[k]) for k in keys if k in line)


def _error(e: BaseException) -> str:
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
def _tf32(on: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# -- 1. the core on the device against the CPU -----------------------------------------------------
N, D, C = 8000, 10, 4   # the core tests' problems (tests/core/problems.py): SGD batches of 1000 ≫ d


def _problem(kind: str, optimizer: str, dtype: torch.dtype):
    """(model, data, extra rows, train settings) of the core tests' problem of this kind."""
    data = synthetic_classification(N, D, C, seed=1, dtype=dtype)
    extra = synthetic_classification(40, D, C, seed=2, dtype=dtype)
    extra = Dataset(extra.X, extra.y, extra.ids + 10 * N)
    model = ModelSpec(kind, D, C, (16,) if kind == "mlp" else ()).build()
    if optimizer == "gd":
        steps, lr, bs = 150, (0.1 if kind == "mlp" else 0.5), None
    else:
        steps, lr, bs = (150, 0.05, 2000) if kind == "mlp" else (120, 0.05, 1000)
    return model, data, extra, dict(steps=steps, lrs=learning_rates(steps, lr), l2=0.01, batch_size=bs, seed=3)


def _changes(data: Dataset, extra: Dataset) -> list[ChangeSet]:
    ids = torch.randperm(N, generator=torch.Generator().manual_seed(7))
    return [make_change_set(data, delete_ids=ids[:8], n_classes=C),
            make_change_set(data, delete_ids=ids[8:88], n_classes=C),
            make_change_set(data, add=extra, n_classes=C),
            make_change_set(data, delete_ids=ids[88:128], add=extra.rows(torch.arange(20)), n_classes=C)]


def _on(traj: Trajectory, device: str) -> Trajectory:
    """The same trajectory with its tensors on ``device`` (the learning rates stay on the CPU)."""
    m = traj.materialize()
    return Trajectory(traj.plan, traj.l2, traj.lrs, traj.initial.to(device), traj.final.to(device), traj.n_rows,
                      None if traj.removed is None else traj.removed.to(device),
                      InMemory(m.params.to(device), m.grads.to(device), m.lrs))


def _moved(ch: ChangeSet, device: str) -> ChangeSet:
    return ChangeSet(ch.delete.to(device), None if ch.add is None else ch.add.to(device=device))


def _replays(model, traj, data, changes, gemm: bool) -> dict:
    """Everything part 1 compares, computed on the device of ``traj`` and ``data``, moved to the CPU."""
    out = {"exact": torch.stack([retrain(model, traj, data, c).cpu() for c in changes])}
    singles = [deltagrad(model, traj, data, c) for c in changes]
    out["single"] = torch.stack([r.params.cpu() for r in singles])
    out["single_counters"] = [(r.explicit_steps, r.approx_steps, r.fallbacks, r.skipped_pairs) for r in singles]
    b = deltagrad_batched(model, traj, data, changes, batch_size=2)
    out["batched"] = b.params.cpu()
    out["batched_counters"] = [tuple(int(getattr(b, k)[i]) for k in ("explicit_steps", "approx_steps", "fallbacks",
                                                                      "skipped_pairs")) for i in range(len(changes))]
    if gemm:
        out["batched_float32_gemm"] = deltagrad_batched(model, traj, data, changes, batch_size=2,
                                                        gemm_dtype=torch.float32).params.cpu()
    return out


def check_core(device: str, kind: str, optimizer: str, dtype: torch.dtype) -> dict:
    """One problem: each computation on ``device`` against the same on the CPU."""
    t0 = time.perf_counter()
    tol = TOLERANCE[(kind, dtype)]
    line = {"check": "core", "device": device, "reference": "cpu", "model": kind, "optimizer": optimizer,
            "dtype": str(dtype).removeprefix("torch."), "n": N, "d": D, "classes": C, "requests": 4,
            "tolerance": tol}
    model, data, extra, settings = _problem(kind, optimizer, dtype)
    line["steps"] = settings["steps"]
    changes = _changes(data, extra)
    data_dev = data.to(device=device)
    gemm = kind == "logreg" and dtype == torch.float64
    traj = train(model, data, **settings)
    trained_dev = train(model, data_dev, **settings)
    traj_dev = _on(traj, device)   # the replays on the device read the CPU's trajectory: only they differ
    cpu = _replays(model, traj, data, changes, gemm)
    dev = _replays(model, traj_dev, data_dev, [_moved(c, device) for c in changes], gemm)
    diffs = {"training": rel(trained_dev.final, traj.final), "exact_retraining": rel(dev["exact"], cpu["exact"]),
             "single": rel(dev["single"], cpu["single"]), "batched": rel(dev["batched"], cpu["batched"]),
             "batched_vs_single": rel(dev["batched"], dev["single"])}
    if gemm:
        diffs["batched_float32_gemm"] = rel(dev["batched_float32_gemm"], cpu["batched_float32_gemm"])
    final = traj.final.double()
    bound = ERROR_BOUND[(kind, optimizer)]
    ratios = [relative_error(dev[k][i].double(), dev["exact"][i].double(), final)
              for k in ("single", "batched", *(("batched_float32_gemm",) if gemm else ())) for i in range(len(changes))]
    effect = min(float((dev["exact"][i].double() - final).norm() / final.norm()) for i in range(len(changes)))
    counters_equal = cpu["single_counters"] == dev["single_counters"] and cpu["batched_counters"] == dev[
        "batched_counters"]
    failures = [f"{k}: {v:.3g} > {tol:g}" for k, v in diffs.items() if not v <= tol]
    if dtype == torch.float64 and not counters_equal:
        failures.append("the replays' counters differ between the devices")
    if not max(ratios) <= bound:
        failures.append(f"DeltaGrad against exact retraining on {device}: error ratio {max(ratios):.3g} > {bound}")
    line.update({k: _small(v) for k, v in diffs.items()})
    line.update({"counters_equal": counters_equal, "error_ratio_max": _small(max(ratios)), "error_bound": bound,
                 "smallest_change_effect": _small(effect), "seconds": round(time.perf_counter() - t0, 2),
                 "ok": not failures})
    if failures:
        line["failures"] = failures
    return line


def run_core(device: str, report: Report, models, optimizers, dtypes) -> None:
    with _tf32(False):
        for dtype in dtypes:
            for kind in models:
                for optimizer in optimizers:
                    try:
                        report.emit(check_core(device, kind, optimizer, dtype))
                    except Exception as e:  # noqa: BLE001 - a failed check is reported, the others still run
                        report.emit({"check": "core", "device": device, "model": kind, "optimizer": optimizer,
                                     "dtype": str(dtype).removeprefix("torch."), "ok": False, "error": _error(e)})


# -- 2. the Ray fan-out on one GPU, from a CPU-only driver ---------------------------------------------
RAY_MODES = {  # mode → RayBackend settings, GPU fractions as a share of one GPU
    "replicated": dict(workers=2, mode="replicated", num_cpus=0.5, gpus=0.5),
    "pipeline": dict(workers=2, mode="pipeline", num_cpus=0.5, gpus=0.5),
    "data-parallel": dict(workers=2, mode="pipeline", num_cpus=0.5, gpus=0.25, data_shards=2, data_cpus=0.25,
                          data_gpus=0.25),
}




def _ray_world(root: pathlib.Path, optimizer: str):
    from deltagrad_ray import api
    from deltagrad_ray.core import leave_one_out
    from deltagrad_ray.store import write_dataset
    data = synthetic_classification(2000, 20, 3, seed=0)
    src = root / "data.parquet"
    if not src.exists():
        write_dataset(data, src)
    sgd = dict(optimizer="sgd", batch_size=500, lr=0.2) if optimizer == "sgd" else dict(lr=0.5)
    cache = api.fit(str(src), str(root / f"cache-{optimizer}"), model="logreg", steps=60, l2=0.01, shard_steps=15,
                    **sgd)  # 4 shards: a pipeline of 2 actors holds 2 each
    extra = synthetic_classification(10, 20, 3, seed=1)
    extra = Dataset(extra.X, extra.y, extra.ids + 10_000)
    changes = (leave_one_out(data, data.ids[:10])
               + [make_change_set(data, delete_ids=torch.arange(100, 130), n_classes=3),
                  make_change_set(data, add=extra, n_classes=3),
                  make_change_set(data, delete_ids=torch.arange(200, 210), add=extra.rows(torch.arange(5)),
                                  n_classes=3)])
    return data, cache, changes


def _bundles(pg) -> list[dict]:
    import ray
    if pg is None:
        return []
    return [dict(b) for _, b in sorted(ray.util.placement_group_table(pg)["bundles"].items())]


def check_ray_mode(device: str, optimizer: str, mode: str, cache, changes, serial, ratio: float) -> dict:
    from deltagrad_ray.distributed.backends import RayBackend
    spec = dict(RAY_MODES[mode])
    cuda = device == "cuda"
    share = spec.pop("gpus")
    gpus = share if cuda else 0
    if "data_gpus" in spec and not cuda:
        spec["data_gpus"] = 0
    t0 = time.perf_counter()
    expected, expected_counters = serial.params, serial.counters
    line = {"check": "ray", "device": device, "reference": "serial backend on the cpu", "mode": mode,
            "optimizer": optimizer, "dtype": "float64", "requests": len(changes), "batch_size": 4,
            "workers": spec["workers"], "num_gpus": gpus, "tolerance": RAY_TOLERANCE}
    if "data_gpus" in spec:
        line["data_gpus"] = spec["data_gpus"]
    notes: list[str] = []
    rb = RayBackend(**spec, num_gpus=gpus, device=device, resource_timeout=120,
                    retry_budget_s=30, notify=notes.append)
    rb.start(cache.uri, None)
    try:
        bundles, data_bundles = _bundles(rb.pg), _bundles(rb.data_pg)
        rep = rb.run(cache.uri, None, changes, batch_size=4)
    finally:
        rb.stop()
    diff = rel(rep.params, expected)
    counters_equal = all(torch.equal(rep.counters[k], expected_counters[k]) for k in expected_counters)
    devices = sorted({a["device"] for a in rep.stats["actors"]})
    failures = []
    if not diff <= RAY_TOLERANCE:
        failures.append(f"params: {diff:.3g} > {RAY_TOLERANCE:g}")
    if rep.errors or serial.errors:
        failures.append(f"failed requests: ray {dict(list(rep.errors.items())[:2])}, serial {len(serial.errors)}")
    if rep.stats["retries"]:
        failures.append(f"{rep.stats['retries']} retries (an actor died or a result could not be read)")
    if not counters_equal:
        failures.append("the replays' counters differ from the serial backend's")
    if devices != [device]:
        failures.append(f"the actors replayed on {devices}, not {device}")
    if gpus and not all(b.get("GPU", 0) == gpus for b in bundles):
        failures.append(f"replay actors' bundles {bundles} do not reserve {gpus} GPU")
    if mode == "data-parallel":
        if len(rep.stats["data_shards"]) != spec["data_shards"]:
            failures.append(f"{len(rep.stats['data_shards'])} data actors, expected {spec['data_shards']}")
        if gpus and not all(b.get("GPU", 0) == spec["data_gpus"] for b in data_bundles):
            failures.append(f"data actors' bundles {data_bundles} do not reserve {spec['data_gpus']} GPU")
    if not ratio <= ERROR_BOUND[("logreg", optimizer)]:
        failures.append(f"the serial replay against exact retraining: error ratio {ratio:.3g}")
    if torch.cuda.is_initialized():
        failures.append("the driver initialised CUDA")
    line.update({"params": _small(diff), "counters_equal": counters_equal, "failed_requests": len(rep.errors),
                 "retries": rep.stats["retries"], "actor_devices": devices, "bundles": bundles,
                 "driver_cuda_initialized": torch.cuda.is_initialized(),
                 "driver_cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                 "error_ratio_max": _small(ratio), "seconds": round(time.perf_counter() - t0, 2)})
    if mode == "data-parallel":
        line["data_bundles"] = data_bundles
    if notes:
        line["notes"] = notes[:3]
    line["ok"] = not failures
    if failures:
        line["failures"] = failures
    return line


def run_ray_driver(device: str, report: Report, optimizers, modes, address: str | None) -> None:
    """The Ray part in this process, which must not touch CUDA (see :func:`run_ray`)."""
    from deltagrad_ray.distributed.backends import SerialBackend
    from deltagrad_ray.distributed.session import ensure_ray
    ensure_ray(address)
    with tempfile.TemporaryDirectory(prefix="deltagrad-gpu-check-") as tmp:
        for optimizer in optimizers:
            try:
                data, cache, changes = _ray_world(pathlib.Path(tmp), optimizer)
                serial = SerialBackend(threads=1).run(cache, None, changes, batch_size=4)
                traj, cdata = cache.trajectory(), cache.data()
                ratio = max(relative_error(serial.params[i], retrain(cache.model, traj, cdata, changes[i]), traj.final)
                            for i in (0, len(changes) - 3, len(changes) - 1))
            except Exception as e:  # noqa: BLE001
                report.emit({"check": "ray", "device": device, "optimizer": optimizer, "ok": False,
                             "error": f"setting up the reference: {_error(e)}"})
                continue
            for mode in modes:
                try:
                    report.emit(check_ray_mode(device, optimizer, mode, cache, changes, serial, ratio))
                except Exception as e:  # noqa: BLE001
                    report.emit({"check": "ray", "device": device, "optimizer": optimizer, "mode": mode, "ok": False,
                                 "error": _error(e)})


def _local_ray(cuda: bool) -> str:
    """Start a Ray of our own on loopback (never one found running on this machine); its address."""
    import ray
    from ray._private import ray_constants
    if ray_constants.ENABLE_RAY_CLUSTER:  # read once, when Ray is imported: main() sets it before
        raise RuntimeError("Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: a local Ray "
                           "would listen on every interface; start this check as a command")
    ray.init(address="local", num_cpus=max(2, min(8, os.cpu_count() or 1)), num_gpus=1 if cuda else 0,
             include_dashboard=False, log_to_driver=False)
    return ray.get_runtime_context().gcs_address


def run_ray(args, report: Report, budget: float) -> None:
    """The Ray part, on the cluster at ``--address`` (one node: the check's cache is in a local
    temporary folder), the one this process is connected to, or a local Ray started here (one GPU
    on CUDA). On CUDA the driver is a child process that sees no GPU (``CUDA_VISIBLE_DEVICES=""``;
    Ray gives the actors theirs); on the CPU this process, unless ``--driver-process child``."""
    import ray
    cuda = args.device == "cuda"
    address = args.address
    if (args.driver_process or ("child" if cuda else "this")) == "this":
        started = not address and not ray.is_initialized()
        if started:
            _local_ray(cuda)
        try:
            run_ray_driver(args.device, report, args.optimizers, args.modes, None if started else address)
        finally:
            if started:
                ray.shutdown()
        return
    if not address and ray.is_initialized():
        address = ray.get_runtime_context().gcs_address
    started = not address
    if started:
        address = _local_ray(cuda)
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--driver", "--device", args.device, "--parts", "ray",
           "--address", address, "--optimizers", ",".join(args.optimizers), "--modes", ",".join(args.modes)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RAY_ADDRESS": address,
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=budget)
        out, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""), None
    finally:
        if started:
            ray.shutdown()
    reported = 0
    for text in out.splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            print(text, file=sys.stderr)
            continue
        if line.get("check") == "ray":
            report.emit(line)
            reported += 1
    if rc is None:
        report.emit({"check": "ray", "device": args.device, "ok": False,
                     "error": f"the driver did not finish within the part's budget of {budget:.0f} s"})
    elif rc != 0 and not reported:
        report.emit({"check": "ray", "device": args.device, "ok": False,
                     "error": f"the driver exited with status {rc} before reporting (its stderr is above)"})


# -- 3. throughput of the batched explicit step ------------------------------------------------------
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
    with _tf32(precision == "tf32"):
        s = _best(lambda: torch.mm(A, B), device, repeats)
    return 2 * size ** 3 / s / 1e9


def _time_step(model, base: Dataset, W: torch.Tensor, w_t: torch.Tensor, device: str, dtype: torch.dtype,
               gemm: torch.dtype | None, tf32: bool, repeats: int) -> tuple[torch.Tensor, float]:
    """(Σ_i ∇ℓ_i(w_b) over all rows (B, p), best seconds of ``repeats`` calls) of the GD explicit step's
    kernel, as :class:`~deltagrad_ray.core.Replay` calls it (no rows removed or added)."""
    rows = LocalRows(model, base.to(dtype=dtype, device=device), len(base), gemm_dtype=gemm)
    Wd, wd = W.to(dtype=dtype, device=device), w_t.to(dtype=dtype, device=device)
    extra = torch.zeros(0, dtype=torch.int64, device=device)
    with _tf32(tf32):
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
                line.update({"ok": False, "error": _error(e)})
            report.emit(line)


# -- the command ----------------------------------------------------------------------------------------
def _list(allowed):
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
                    help="cuda (default; choose the GPU with CUDA_VISIBLE_DEVICES) or cpu (the checks CPU against CPU)")
    ap.add_argument("--parts", type=_list(PARTS), default=list(PARTS), help="core,ray,throughput (default all)")
    ap.add_argument("--models", type=_list(("logreg", "mlp")), default=["logreg", "mlp"])
    ap.add_argument("--optimizers", type=_list(("gd", "sgd")), default=["gd", "sgd"])
    ap.add_argument("--dtypes", type=_list(tuple(DTYPES)), default=list(DTYPES), help="part 1's precisions")
    ap.add_argument("--modes", type=_list(tuple(RAY_MODES)), default=list(RAY_MODES), help="part 2's modes")
    ap.add_argument("--address", default=None,
                    help="a one-node Ray cluster for part 2 (default: a local Ray of its own, with one GPU)")
    ap.add_argument("--rows", type=int, default=60_000, help="part 3's rows (784 features, 10 classes)")
    ap.add_argument("--batch-sizes", type=_ints, default=[32, 128], help="part 3's B")
    ap.add_argument("--precisions", type=_list(tuple(PRECISIONS)), default=list(PRECISIONS))
    ap.add_argument("--peak-size", type=int, default=None, help="matmul size of the peak (default 8192 on cuda, 2048)")
    ap.add_argument("--repeats", type=int, default=5, help="part 3's timings are the best of this many")
    ap.add_argument("--driver-process", choices=("this", "child"), default=None,
                    help="where part 2's driver runs: a child process with CUDA hidden (default on cuda) or this one")
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)  # the child process of part 2
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.address:  # a local Ray, if one is started, keeps every process on loopback (read at import)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cuda = args.device == "cuda"
    report = Report()
    if args.driver:  # part 2's driver: no CUDA here, whatever the device of the actors
        run_ray_driver(args.device, report, args.optimizers, args.modes, args.address)
        return 1 if report.failed else 0
    if cuda and not torch.cuda.is_available():
        report.emit({"check": "environment", "ok": True, "skipped": True,
                     "message": f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False): "
                                "nothing was checked; --device cpu runs the same checks CPU against CPU"})
        return 0
    env = {"check": "environment", "device": args.device, "torch": torch.__version__, "ray": version("ray"),
           "cuda": torch.version.cuda, "ok": True}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update({"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                    "gpus_visible": torch.cuda.device_count()})
    else:
        env["threads"] = torch.get_num_threads()
    report.emit(env)
    t_start = time.perf_counter()
    spent: dict[str, float] = {}
    for part in PARTS:
        if part not in args.parts:
            continue
        t0 = time.perf_counter()
        if part == "core":
            run_core(args.device, report, args.models, args.optimizers, [DTYPES[k] for k in args.dtypes])
        elif part == "ray":
            run_ray(args, report, BUDGET_S["ray"])
        else:
            run_throughput(args.device, report, args.rows, args.batch_sizes, args.precisions,
                           args.peak_size or (8192 if cuda else 2048), args.repeats)
        spent[part] = round(time.perf_counter() - t0, 1)
    over = [p for p, s in spent.items() if cuda and s > BUDGET_S[p]]
    report.emit({"check": "summary", "device": args.device, "passed": report.passed, "failed": len(report.failed),
                 "failed_checks": report.failed, "seconds": round(time.perf_counter() - t_start, 1),
                 "seconds_per_part": spent, "budget_s": {p: BUDGET_S[p] for p in spent}, "over_budget": over,
                 "ok": not report.failed})
    return 1 if report.failed else 0


def _terminated(signum, frame):  # the wrapper's time limit: unwind, so the child driver and Ray stop too
    raise SystemExit(124)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(main())
