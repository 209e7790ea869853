"""The GPU checks' comparisons: each computes the same thing on ``device`` and on the CPU and returns
the measured differences; the tests (test_cuda.py, test_cpu.py) hold them to the tolerances below.

1. **core** (:func:`compare_core`) — logistic regression and a ReLU MLP, GD and SGD, float64 and
   float32, four change sets (8 and 80 rows deleted, 40 added, 40 deleted with 20 added): training,
   exact retraining, the single-request replay (``deltagrad``) and the batched replay
   (``deltagrad_batched``, B = 2, two batches per pass; also with float32 difference-form GEMMs for
   float64 logistic regression) on the device, each compared with the same computation on the CPU.
2. **ray** (:func:`compare_ray_mode`) — ``RayBackend(workers=2, num_gpus=0.5, device="cuda")`` in
   replicated and pipeline mode, and in data-parallel mode (two replay actors and two data actors at
   0.25 GPU each, the data actors reserving GPUs too), against the serial backend on the CPU, GD and
   SGD, float64. On CUDA a Ray of the test's own (:func:`ray_of_its_own`: one GPU, on loopback, in a
   process of its own) runs the actors, and the driver is a child process with
   ``CUDA_VISIBLE_DEVICES=""`` (:func:`child_driver`, as on a CPU-only head node): the driver must
   never initialise CUDA, so a GPU tensor leaving an actor fails the check.

Every replay is also compared with exact retraining on the device (‖θ_DG − θ_exact‖ ≤ bound ×
‖θ_exact − θ_full‖, :data:`ERROR_BOUND`), so a check also fails if the replay did nothing on either
device.

Run as a command, this module is one of the two helper processes of the Ray check::

    python -m tests.gpu.checks host --gpus 1        # a local Ray on loopback: prints its address, stops at EOF on stdin
    python -m tests.gpu.checks driver --device cuda --address ADDR   # one JSON line per mode

Nothing here is imported by the library (tests/test_layers.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

from deltagrad_ray.core import (ChangeSet, Dataset, InMemory, ModelSpec, Trajectory, deltagrad, deltagrad_batched,
                                learning_rates, make_change_set, relative_error, retrain, synthetic_classification,
                                train)
from benchmarks.gpu import comma_list, error_text, rel, tf32_matmuls
from tests.processes import python

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Tolerances: relative, ‖a − b‖/‖b‖ per request, the largest over requests (:func:`rel`).
#
# float64: 1e-8 (and every counter equal). The devices sum in other orders (cuBLAS and the CPU BLAS
# block their reductions differently), so results differ by rounding only. Scaling the float32
# differences below by the ratio of the two unit roundoffs (2⁻⁵³/2⁻²⁴ ≈ 2e-9) predicts at most ~5e-14
# with the compact L-BFGS model; the multi-secant model (the default for GD logistic regression)
# inverts its pairs down to singular values 1e-6 of the largest, which amplifies round-off up to
# ~1e6× (measured ≤ 5e-11 between summation orders on the CPU), so 1e-8 leaves a factor 200, and the
# replays' decisions (explicit or approximate step, pair skipped) sit far from their thresholds at
# that level. Anything a device bug does — a tensor left on the wrong device, a row missed, a
# correction dropped — moves the result by the change's own effect, 7e-4 to 2e-2 of ‖θ‖ here.
#
# float32: 1e-5 for logistic regression, 5e-4 for the MLP. On the CPU, the float32 result of each
# computation differs from the float64 one by at most 2.4e-7 (logistic regression) and 2.4e-5 (the
# MLP, whose training amplifies perturbations 100× more; SGD replay); two float32 computations that
# round differently differ by about √2 times that, and the tolerances leave a factor 10 or more on
# top. Counters are reported, not required.
TOLERANCE = {("logreg", torch.float64): 1e-8, ("mlp", torch.float64): 1e-8,
             ("logreg", torch.float32): 1e-5, ("mlp", torch.float32): 5e-4}
# Ray: 1e-8 against the serial CPU backend (as float64 above), no request failed, no retry.
RAY_TOLERANCE = 1e-8
# DeltaGrad against exact retraining (tests/core/test_replay.py: 5% of the change's effect for the
# convex model; the ReLU MLP, with no such guarantee, 15% under GD and 30% under SGD)
ERROR_BOUND = {("logreg", "gd"): 0.05, ("logreg", "sgd"): 0.05, ("mlp", "gd"): 0.15, ("mlp", "sgd"): 0.3}
CORE_CASES = [(kind, optimizer, dtype) for dtype in (torch.float64, torch.float32) for kind in ("logreg", "mlp")
              for optimizer in ("gd", "sgd")]


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
    """Everything :func:`compare_core` compares, computed on the device of ``traj`` and ``data``, moved to the CPU."""
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


def compare_core(device: str, kind: str, optimizer: str, dtype: torch.dtype) -> dict:
    """One problem: each computation on ``device`` against the same on the CPU (TF32 off).

    Returns ``diffs`` (name → :func:`rel` of the device's result against the CPU's: ``training``,
    ``exact_retraining``, ``single``, ``batched``, ``batched_float32_gemm`` for float64 logistic
    regression, and ``batched_vs_single`` on the device), ``counters_equal`` (the replays' counters,
    device against CPU), ``error_ratio_max`` (every replay on the device against exact retraining on
    the device, as a share of the change's effect) and ``smallest_change_effect``."""
    t0 = time.perf_counter()
    with tf32_matmuls(False):  # float32 matmuls in float32 (TF32 would round operands to 10 bits)
        model, data, extra, settings = _problem(kind, optimizer, dtype)
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
    ratios = [relative_error(dev[k][i].double(), dev["exact"][i].double(), final)
              for k in ("single", "batched", *(("batched_float32_gemm",) if gemm else ())) for i in range(len(changes))]
    effect = min(float((dev["exact"][i].double() - final).norm() / final.norm()) for i in range(len(changes)))
    return {"device": device, "model": kind, "optimizer": optimizer, "dtype": str(dtype).removeprefix("torch."),
            "steps": settings["steps"], "diffs": diffs,
            "counters_equal": cpu["single_counters"] == dev["single_counters"]
            and cpu["batched_counters"] == dev["batched_counters"],
            "error_ratio_max": max(ratios), "smallest_change_effect": effect,
            "seconds": round(time.perf_counter() - t0, 2)}


def core_failures(m: dict) -> list[str]:
    """What is wrong with a :func:`compare_core` result, as sentences (empty when all is well): a
    difference over :data:`TOLERANCE`, counters that differ (float64), a replay farther from exact
    retraining than :data:`ERROR_BOUND` or exactly on it (it did nothing), a change too small to tell."""
    tol = TOLERANCE[(m["model"], getattr(torch, m["dtype"]))]
    bound = ERROR_BOUND[(m["model"], m["optimizer"])]
    failures = [f"{k}: {v:.3g} > {tol:g}" for k, v in m["diffs"].items() if not v <= tol]
    if m["dtype"] == "float64" and not m["counters_equal"]:
        failures.append("the replays' counters differ between the devices")
    if not 0 < m["error_ratio_max"] <= bound:
        failures.append(f"DeltaGrad against exact retraining on {m['device']}: error ratio {m['error_ratio_max']:.3g} "
                        f"not in (0, {bound}]")
    if not m["smallest_change_effect"] > 1e-4:
        failures.append(f"a change moves the model by only {m['smallest_change_effect']:.3g} of its norm")
    return failures


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
    return cache, changes


def ray_reference(root: pathlib.Path, optimizer: str) -> dict:
    """The Ray check's world in ``root`` (a cache of logistic regression on 2,000 rows, 13 requests)
    and its reference: the serial backend on the CPU, and that replay's error ratio against exact
    retraining (first, 11th and last request). Needs no Ray."""
    from deltagrad_ray.distributed.backends import SerialBackend
    cache, changes = _ray_world(root, optimizer)
    serial = SerialBackend(threads=1).run(cache, None, changes, batch_size=4)
    traj, cdata = cache.trajectory(), cache.data()
    ratio = max(relative_error(serial.params[i], retrain(cache.model, traj, cdata, changes[i]), traj.final)
                for i in (0, len(changes) - 3, len(changes) - 1))
    return {"optimizer": optimizer, "cache": cache, "changes": changes, "serial": serial, "ratio": ratio}


def _bundles(pg) -> list[dict]:
    import ray
    if pg is None:
        return []
    return [dict(b) for _, b in sorted(ray.util.placement_group_table(pg)["bundles"].items())]


def ray_mode_settings(device: str, mode: str) -> dict:
    """``RayBackend`` settings of ``mode`` on ``device`` (no GPUs reserved on the CPU)."""
    spec = dict(RAY_MODES[mode])
    share = spec.pop("gpus")
    spec["num_gpus"] = share if device == "cuda" else 0
    if "data_gpus" in spec and device != "cuda":
        spec["data_gpus"] = 0
    return spec


def compare_ray_mode(device: str, mode: str, reference: dict) -> dict:
    """``RayBackend`` in ``mode`` with its actors on ``device``, driven from this process (connected
    to Ray), against the serial CPU backend of ``reference`` (:func:`ray_reference`). Returns the
    difference (``params``), whether the counters are equal, failed requests, retries, the actors'
    devices, the placement groups' bundles and whether this driver initialised CUDA."""
    from deltagrad_ray.distributed.backends import RayBackend
    spec = ray_mode_settings(device, mode)
    serial, changes = reference["serial"], reference["changes"]
    t0 = time.perf_counter()
    notes: list[str] = []
    rb = RayBackend(**spec, device=device, resource_timeout=120, retry_budget_s=30, notify=notes.append)
    rb.start(reference["cache"].uri, None)
    try:
        bundles, data_bundles = _bundles(rb.pg), _bundles(rb.data_pg)
        rep = rb.run(reference["cache"].uri, None, changes, batch_size=4)
    finally:
        rb.stop()
    line = {"check": "ray", "device": device, "mode": mode, "optimizer": reference["optimizer"],
            "requests": len(changes), "settings": spec, "params": rel(rep.params, serial.params),
            "counters_equal": all(torch.equal(rep.counters[k], serial.counters[k]) for k in serial.counters),
            "failed_requests": len(rep.errors), "errors": [str(e)[:300] for e in list(rep.errors.values())[:2]],
            "serial_failed_requests": len(serial.errors), "retries": rep.stats["retries"],
            "actor_devices": sorted({a["device"] for a in rep.stats["actors"]}),
            "data_shards": len(rep.stats.get("data_shards") or []), "bundles": bundles,
            "data_bundles": data_bundles, "error_ratio_max": reference["ratio"],
            "driver_cuda_initialized": torch.cuda.is_initialized(),
            "driver_cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "seconds": round(time.perf_counter() - t0, 2)}
    if notes:
        line["notes"] = notes[:3]
    return line


def ray_failures(line: dict, device: str) -> list[str]:
    """What is wrong with a :func:`compare_ray_mode` line, as sentences (empty when all is well)."""
    if "error" in line:
        return [line["error"]]
    failures = []
    mode, spec = line["mode"], line["settings"]
    if not line["params"] <= RAY_TOLERANCE:
        failures.append(f"params: {line['params']:.3g} > {RAY_TOLERANCE:g}")
    if line["failed_requests"] or line["serial_failed_requests"]:
        failures.append(f"failed requests: ray {line['failed_requests']} {line['errors']}, "
                        f"serial {line['serial_failed_requests']}")
    if line["retries"]:
        failures.append(f"{line['retries']} retries (an actor died or a result could not be read)")
    if not line["counters_equal"]:
        failures.append("the replays' counters differ from the serial backend's")
    if line["actor_devices"] != [device]:
        failures.append(f"the actors replayed on {line['actor_devices']}, not {device}")
    if spec["num_gpus"] and not all(b.get("GPU", 0) == spec["num_gpus"] for b in line["bundles"]):
        failures.append(f"replay actors' bundles {line['bundles']} do not reserve {spec['num_gpus']} GPU")
    if mode == "data-parallel":
        if line["data_shards"] != spec["data_shards"]:
            failures.append(f"{line['data_shards']} data actors, expected {spec['data_shards']}")
        if spec["data_gpus"] and not all(b.get("GPU", 0) == spec["data_gpus"] for b in line["data_bundles"]):
            failures.append(f"data actors' bundles {line['data_bundles']} do not reserve {spec['data_gpus']} GPU")
    bound = ERROR_BOUND[("logreg", line["optimizer"])]
    if not 0 < line["error_ratio_max"] <= bound:
        failures.append(f"the serial replay against exact retraining: error ratio {line['error_ratio_max']:.3g} "
                        f"not in (0, {bound}]")
    if line["driver_cuda_initialized"]:
        failures.append("the driver initialised CUDA")
    return failures


def run_driver(device: str, optimizers, modes, address: str | None) -> None:
    """The child driver: connect to ``address``, print one JSON line per optimizer and mode (a line
    with ``"error"`` for a mode that raised). This process must not touch CUDA."""
    from deltagrad_ray.distributed.session import ensure_ray
    ensure_ray(address)
    with tempfile.TemporaryDirectory(prefix="deltagrad-gpu-check-") as tmp:
        for optimizer in optimizers:
            try:
                reference = ray_reference(pathlib.Path(tmp), optimizer)
            except Exception as e:  # noqa: BLE001 - reported; the test fails on it
                _emit({"check": "ray", "device": device, "optimizer": optimizer,
                       "error": f"setting up the reference: {error_text(e)}"})
                continue
            for mode in modes:
                try:
                    _emit(compare_ray_mode(device, mode, reference))
                except Exception as e:  # noqa: BLE001 - reported, the other modes still run
                    _emit({"check": "ray", "device": device, "optimizer": optimizer, "mode": mode,
                           "error": error_text(e)})


def _emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def local_ray(gpus: int) -> str:
    """Start a Ray of this process's own on loopback (never one found running on this machine), with
    ``gpus`` GPUs; its address."""
    import ray
    from ray._private import ray_constants
    if ray_constants.ENABLE_RAY_CLUSTER:  # read once, when Ray is imported: main() sets it before
        raise RuntimeError("Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: a local Ray "
                           "would listen on every interface")
    ray.init(address="local", num_cpus=max(2, min(8, os.cpu_count() or 1)), num_gpus=gpus,
             include_dashboard=False, log_to_driver=False)
    return ray.get_runtime_context().gcs_address


def host(gpus: int) -> None:
    """The Ray host: a local Ray with ``gpus`` GPUs; prints ``{"address": ...}``, then keeps Ray up
    until stdin reaches its end (the test closes it, or its process ends) or SIGTERM comes."""
    import ray
    address = local_ray(gpus)
    try:
        _emit({"address": address})
        sys.stdin.read()
    finally:
        ray.shutdown()


def _child_env(**extra: str) -> dict:
    """The environment of a helper process: this checkout first on the path (Ray's workers import
    it too), every Ray process on loopback."""
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), **extra}


@contextmanager
def ray_of_its_own(gpus: int):
    """A local Ray with ``gpus`` GPUs in a process of its own (``python -m tests.gpu.checks host``),
    whatever Ray this process is connected to; yields its address, stops it on exit."""
    with tempfile.TemporaryFile("w+") as err, subprocess.Popen(
            python("-m", "tests.gpu.checks", "host", "--gpus", str(gpus)), cwd=ROOT, env=_child_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True) as proc:
        try:
            address = None
            for text in proc.stdout:
                try:
                    address = json.loads(text)["address"]
                    break
                except (ValueError, TypeError, KeyError):
                    continue
            if address is None:
                err.seek(0)
                raise RuntimeError(f"the Ray host exited with status {proc.wait()} before giving its address: "
                                   f"{err.read()[-3000:]}")
            yield address
        finally:
            proc.stdin.close()  # the host stops its Ray and exits
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def child_driver(address: str, device: str, optimizers, modes, timeout_s: float = 840) -> tuple[int, list[dict], str]:
    """Run :func:`run_driver` in a child process that sees no GPU (``CUDA_VISIBLE_DEVICES=""``, as on
    a CPU-only head node), connected to the Ray at ``address``. Returns (exit status, its ``ray``
    lines, its stderr). ``timeout_s`` only guards against a hang."""
    cmd = python("-m", "tests.gpu.checks", "driver", "--device", device, "--address", address,
                 "--optimizers", ",".join(optimizers), "--modes", ",".join(modes))
    proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(CUDA_VISIBLE_DEVICES="", RAY_ADDRESS=address),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s)
    lines = []
    for text in proc.stdout.splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("check") == "ray":
            lines.append(line)
    return proc.returncode, lines, proc.stderr


# -- the helper processes ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.gpu.checks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    h = sub.add_parser("host", help="a local Ray on loopback until EOF on stdin")
    h.add_argument("--gpus", type=int, default=1)
    d = sub.add_parser("driver", help="the Ray check's driver: one JSON line per optimizer and mode")
    d.add_argument("--device", choices=("cuda", "cpu"), required=True)
    d.add_argument("--address", required=True)
    d.add_argument("--optimizers", type=comma_list(("gd", "sgd")), default=["gd", "sgd"])
    d.add_argument("--modes", type=comma_list(tuple(RAY_MODES)), default=list(RAY_MODES))
    args = ap.parse_args(argv)
    if args.command == "host":
        host(args.gpus)
    else:
        run_driver(args.device, args.optimizers, args.modes, args.address)
    return 0


def _terminated(signum, frame):  # unwind, so that the host stops its Ray
    raise SystemExit(124)


if __name__ == "__main__":
    # a local Ray keeps every process on loopback (Ray reads this when first imported)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(main())
