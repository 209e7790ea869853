"""The ``deltagrad-ray`` command: parses arguments, calls :mod:`deltagrad_ray.api`, prints JSON.

Exit codes (README, "Exit codes"): 0 success; 1 unexpected failure (a bug: please report it); 2
bad input (the message names the problem), a diverged run, an output over an input, a fan-out
where every request failed; 3 storage failure (missing, unreachable, read-only, corrupted); 130
interrupted (Ctrl-C or SIGTERM). As the ``deltagrad-ray`` command, :func:`main` ends the process
with the code itself (:mod:`deltagrad_ray.runtime`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from . import environment
from .runtime import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK

EXAMPLES = """\
examples:
  deltagrad-ray make-data --kind classification --n 60000 --d 784 --classes 10 --out data.parquet
  deltagrad-ray train --data data.parquet --model logreg --optimizer gd --steps 120 --lr 0.1 --l2 0.005 --cache runs/c1
  deltagrad-ray unlearn --cache runs/c1 --delete ids.txt --out unlearned.safetensors
  deltagrad-ray retrain --cache runs/c1 --delete ids.txt --out exact.safetensors
  deltagrad-ray evaluate --model unlearned.safetensors --data data.parquet
  deltagrad-ray loo --cache runs/c1 --ids ids.txt --batch-size 32 --out loo.parquet
  deltagrad-ray jackknife --cache runs/c1 --test test.parquet --out jackknife.parquet
  deltagrad-ray influence --cache runs/c1 --test test.parquet --out influence.parquet
  deltagrad-ray conformal --cache runs/c1 --test test.parquet --alpha 0.1 --method jackknife+ --out conformal.parquet
  deltagrad-ray erasure status --output s3://bucket/models
  deltagrad-ray demo
"""


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one ``error: …`` line (the house format) and exit 2."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"error: {message} (see {self.prog} --help)\n")


def _range(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _integer(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi]; a one-line error naming the range otherwise."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {_range(lo, hi)}, got {text!r}")
        return v
    return parse


def _real(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite number in the range (no nan, no inf); a one-line error otherwise."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (
            hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number {_range(lo, hi, lo_open, hi_open)}, "
                                             f"got {text!r}")
        return v
    return parse


_COUNT, _SIZE = _integer(1), _integer(0)
_SEED = _integer(0, 2**63 - 1)
_POSITIVE = _real(0, lo_open=True)
_NONNEGATIVE = _real(0)


def _ints(text: str) -> tuple[int, ...]:
    """Comma-separated integers >= 1 (hidden sizes, milestone steps)."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def _add_change_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", required=True, help="trajectory cache location (written by train)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--delete", metavar="IDS", help="ids to delete: a text file (one id per line) or Parquet with 'id'")
    g.add_argument("--add", metavar="DATA", help="rows to add: a data set (id, label, features)")
    p.add_argument("--data", help="the training data (default: the location recorded in the cache)")
    p.add_argument("--out", required=True, help="model file to write (safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


# the DeltaGrad settings a user tunes, as flags named after DeltaGradConfig's fields (unset: its default);
# choices and defaults come from DeltaGradConfig itself (CHOICES, the fields' defaults), not from here
_CHOICE = None  # a flag whose values are DeltaGradConfig.CHOICES[field]
_DG_FLAGS = (
    ("--period", _COUNT, "T0: an explicit step every T0 steps after the burn-in (unset: 10 with the secant and "
     "shared curvatures, else 5)"),
    ("--burn-in", _SIZE, "j0: explicit steps at the start"),
    ("--history", _COUNT, "m: L-BFGS pairs kept per request"),
    ("--schedule", _CHOICE, "explicit steps: every T0 (uniform), growing gaps (geometric), or shortened where the "
     "L-BFGS prediction measured at explicit steps is poor (adaptive)"),
    ("--sigma", _CHOICE, "scale of the initial L-BFGS matrix (sy/ss: the authors' rule)"),
    ("--curvature-guard", _real(1), "refuse approximations beyond this multiple of the measured curvature"),
    ("--max-curvature", _POSITIVE, "a known bound on the Hessian's norm (refuse approximations beyond it)"),
    ("--first-gap", _COUNT, "geometric schedule: first gap"),
    ("--growth", _real(1), "geometric schedule: growth of the gaps"),
    ("--max-gap", _COUNT, "geometric schedule: largest gap"),
    ("--adaptive-tol", _POSITIVE, "adaptive schedule: prediction error that halves the gap"),
    ("--curvature", _CHOICE, "curvature of the approximate steps: each request's own L-BFGS pairs (own), its own "
     "pairs of the last explicit steps as a multi-secant model (secant), the batch's pairs as one multi-secant "
     "model (shared), own pairs plus the cached path's secant pairs (own+path); auto: secant for GD-trained "
     "logreg/linear, else own"),
    ("--shared-history", _COUNT, "secant and shared curvature: explicit steps whose pairs are kept"),
    ("--path-pairs", _COUNT, "own+path curvature: secant pairs of the cached path added"),
)


def _add_deltagrad_args(p: argparse.ArgumentParser) -> None:
    import dataclasses

    from .api import DeltaGradConfig
    defaults = {f.name: f.default for f in dataclasses.fields(DeltaGradConfig)}
    g = p.add_argument_group("DeltaGrad settings")
    for flag, kind, helptext in _DG_FLAGS:
        name = flag[2:].replace("-", "_")
        default = defaults[name]
        shown = helptext if default is None else f"{helptext} (default {default})"
        if kind is _CHOICE:
            g.add_argument(flag, choices=DeltaGradConfig.CHOICES[name], default=None, help=shown)
        else:
            g.add_argument(flag, type=kind, default=None, help=shown)


def _deltagrad_config(a: argparse.Namespace):
    """The DeltaGradConfig of the flags given (the others keep their defaults)."""
    from .api import DeltaGradConfig
    given = {flag[2:].replace("-", "_"): getattr(a, flag[2:].replace("-", "_")) for flag, _, _ in _DG_FLAGS}
    return DeltaGradConfig.from_dict({k: v for k, v in given.items() if v is not None})


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="deltagrad-ray", description="Rapid retraining after deletions and additions (DeltaGrad), on Ray.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    ap.add_argument("--json", action="store_true", help="print results as JSON lines (for scripts)")
    ap.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// locations (default: AWS_ENDPOINT_URL_S3, "
                    "AWS_ENDPOINT_URL, or the AWS config file); carried to Ray actors with the locations")
    ap.add_argument("--profile", help="AWS profile for s3:// locations (default: AWS_PROFILE); carried to Ray "
                    "actors, whose nodes must have it")
    ap.add_argument("--region", help="AWS region for s3:// locations (default: AWS_REGION); carried to Ray actors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model and record its trajectory cache",
                       description="Train by GD or SGD and record θ_t, g_t, η_t per step as a cache.")
    p.add_argument("--data", required=True, help="data set (Parquet: id, label, features)")
    p.add_argument("--model", required=True, choices=["logreg", "linear", "mlp"])
    p.add_argument("--hidden", type=_ints, default=(), help="MLP hidden sizes, e.g. 300,100")
    p.add_argument("--optimizer", choices=["gd", "sgd"], default="gd")
    p.add_argument("--steps", type=_COUNT, required=True, help="T, number of steps")
    p.add_argument("--batch-size", type=_COUNT, default=None, help="mini-batch size (sgd)")
    p.add_argument("--lr", type=_POSITIVE, required=True, help="learning rate η")
    p.add_argument("--lr-milestones", type=_ints, default=(), help="steps where η is multiplied by --lr-gamma")
    p.add_argument("--lr-gamma", type=_POSITIVE, default=0.1)
    p.add_argument("--l2", type=_NONNEGATIVE, default=0.0, help="λ of (λ/2)‖θ‖²")
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--classes", type=_integer(2), default=None, help="number of classes (default: max label + 1)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0")
    p.add_argument("--shard-steps", type=_COUNT, default=None, help="steps per cache shard (default: ~64 MB shards)")
    p.add_argument("--shard-mb", type=_POSITIVE, default=None, help="cache shard size in MB (instead of --shard-steps)")
    p.add_argument("--storage-dtype", choices=["float64", "float32", "float16", "bfloat16"], default=None,
                   help="precision of the cached vectors (default: --dtype)")
    p.add_argument("--mmap-features", action="store_true",
                   help="also store the features as a memory-mappable copy in the (local) cache, so later commands "
                        "map them instead of decoding Parquet (n × d × 8 bytes more on disk)")
    p.add_argument("--cache", required=True, help="where to write the cache (must not exist)")

    for name, helptext in (("unlearn", "DeltaGrad: the model after deleting or adding rows"),
                           ("retrain", "exact retraining after deleting or adding rows (the ground truth)")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        _add_change_args(p)
        p.add_argument("--device", default="cpu")
        if name == "unlearn":
            _add_deltagrad_args(p)
            p.add_argument("--out-cache", help="also write the replayed trajectory as a new cache here "
                           "(a new location; later changes can start from it)")

    many_help = {
        "loo": "leave-one-out models for many ids (batched DeltaGrad) → Parquet: id, params, diagnostics",
        "jackknife": "jackknife estimates, bias corrections and standard errors of test predictions and loss",
        "influence": "per training id, the leave-one-out change in test loss",
        "conformal": "jackknife+ / CV+ prediction intervals (regression) or sets (classification)",
    }
    for name, helptext in many_help.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--cache", required=True)
        if name != "loo":
            p.add_argument("--test", required=True, help="test data (Parquet: id, features[, label])")
        p.add_argument("--ids", help="training ids to leave out (default: all of the cache's points)")
        p.add_argument("--batch-size", type=_COUNT, default=32, help="requests replayed together (B)")
        p.add_argument("--backend", choices=["serial", "ray"], default="serial")
        p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
        p.add_argument("--connect-timeout", type=_POSITIVE, default=30.0, metavar="SECONDS",
                       help="Ray: give up on an --address where nothing answers after this long (default 30)")
        p.add_argument("--workers", type=_COUNT, default=2, help="Ray shard actors")
        p.add_argument("--mode", choices=["auto", "pipeline", "replicated"], default="auto",
                       help="Ray: actors own step ranges (pipeline) or all steps (replicated)")
        p.add_argument("--num-cpus", type=_POSITIVE, default=1, help="Ray: CPUs per actor")
        p.add_argument("--num-gpus", type=_NONNEGATIVE, default=0, help="Ray: GPUs per actor (fractions allowed)")
        p.add_argument("--data-shards", type=_data_shards, default="auto",
                       help="Ray: split the training features over this many data actors (default auto: "
                            "only when they do not fit one actor's memory)")
        p.add_argument("--gemm-dtype", choices=["float64", "float32"], default=None,
                       help="precision of the batched explicit-step GEMMs (linear models; default: the data's)")
        p.add_argument("--data", help="the training data (default: the location recorded in the cache)")
        p.add_argument("--out", required=True, help="results (Parquet)")
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--max-model-mb", type=_NONNEGATIVE, default=1024,
                       help="replayed models held in memory at most; beyond, they stay in --out's parts and are "
                            "read back a chunk at a time")
        _add_deltagrad_args(p)
        p.add_argument("--verify", type=_COUNT, default=None, metavar="K",
                       help="also retrain K requests drawn at random exactly and state a bound on the error of "
                            "95%% of all requests at 95%% confidence (K = 59 and up: README, Verification)")
        if name in ("loo", "jackknife", "influence"):
            p.add_argument("--exact-above", type=_NONNEGATIVE, default=None, metavar="E",
                           help="retrain exactly every request whose error estimate is above E (or not finite); "
                                "the table's 'method' column marks them")
        if name != "loo":
            p.add_argument("--memory-mb", type=_POSITIVE, default=256,
                           help="working memory of the statistics, which stream over chunks of models and test points")
        if name == "conformal":
            p.add_argument("--alpha", type=_real(0, 1, lo_open=True, hi_open=True), default=0.1,
                           help="miscoverage level, in (0, 1)")
            p.add_argument("--method", choices=["jackknife+", "cv+"], default="jackknife+")
            p.add_argument("--folds", type=_integer(2), default=10, help="K for cv+")
            p.add_argument("--seed", type=_SEED, default=0, help="fold assignment seed for cv+")

    p = sub.add_parser("evaluate", help="accuracy and loss (or MSE) of a model on data")
    p.add_argument("--model", required=True, help="model file (safetensors)")
    p.add_argument("--data", required=True)

    p = sub.add_parser("make-data", help="write a synthetic or scikit-learn data set as Parquet")
    p.add_argument("--kind", required=True,
                   choices=["classification", "regression", "digits", "breast_cancer", "diabetes", "wine", "iris"])
    p.add_argument("--n", type=_COUNT, default=10_000)
    p.add_argument("--d", type=_COUNT, default=20)
    p.add_argument("--classes", type=_integer(2), default=10)
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    _add_erasure_args(sub)

    p = sub.add_parser("config-schema", help="the JSON Schema of a job's config file (for editors that validate YAML)")
    p.add_argument("job", choices=["train", "bulk_erasure", "jackknife", "conformal"])
    p = sub.add_parser("demo", help="the main job on embedded defaults (see README)")
    p.add_argument("--out", default=None, help="working directory (default: demo-output/<time>)")
    p.add_argument("--n", type=_COUNT, default=20_000, help="rows of the MNIST-shaped data set")
    p.add_argument("--d", type=_COUNT, default=784)
    p.add_argument("--steps", type=_COUNT, default=120)
    return ap


def _add_erasure_args(sub) -> None:
    """``erasure status | trace | abandon | repair | prune | publish``: the operator's view of bulk erasure."""
    p = sub.add_parser("erasure", help="bulk erasure: status, receipts (trace), abandon, repair, prune, publish",
                       description="The operator's view of bulk erasure (see README, Bulk erasure). --config names "
                                   "the job's config (every model of its fleet); --output one model's prefix.")
    esub = p.add_subparsers(dest="erasure_command", required=True, metavar="ACTION")

    def which(q, many: bool = True) -> None:
        g = q.add_mutually_exclusive_group(required=True)
        g.add_argument("--config", help="the bulk_erasure job's config (YAML/JSON): every model of its fleet")
        g.add_argument("--output", action="append" if many else None,
                       help="a model's output prefix (holds LATEST.json)" + ("; repeat for several" if many else ""))
        q.add_argument("--requests", help="the requests inbox (default: the config's)")

    q = esub.add_parser("status", help="per model: published version and lineage, open plans, lease, pending "
                                       "requests, last failure")
    which(q)
    q = esub.add_parser("trace", help="the receipt of one id (or request): held, erased in which version, still "
                                      "held anywhere, until when")
    which(q)
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--data-id", type=int, help="the training row's id")
    g.add_argument("--request-id", help="the request's id (its data ids from the inbox and the plans)")
    q = esub.add_parser("abandon", help="abandon an open plan: its requests pend again (recorded in the audit)")
    q.add_argument("run_id", metavar="RUN_ID", help="the run whose plan to abandon (see `erasure status`)")
    q.add_argument("--output", required=True, help="the model's output prefix")
    q.add_argument("--reason", default="abandoned by an operator", help="recorded in the audit")
    q.add_argument("--wait", type=_NONNEGATIVE, default=0.0, help="seconds to wait for the lease (default 0)")
    q = esub.add_parser("repair", help="point LATEST.json back at the newest version of the lineage (versions/)")
    q.add_argument("--output", required=True, help="the model's output prefix")
    q.add_argument("--wait", type=_NONNEGATIVE, default=0.0, help="seconds to wait for the lease (default 0)")
    q = esub.add_parser("prune", help="delete superseded versions' caches past retention (recorded in the audit)")
    which(q)
    q.add_argument("--days", type=_NONNEGATIVE, default=None,
                   help="retention in days (default: the config's retention.superseded_days)")
    q.add_argument("--dry-run", action="store_true", help="say what would be deleted; delete nothing")
    q = esub.add_parser("publish", help="publish a trained cache as version 0 of an output prefix")
    q.add_argument("--cache", required=True, help="the trained cache")
    q.add_argument("--output", required=True, help="the models prefix (must have no published version)")


_JSON = False


def _emit(obj: dict) -> None:
    """One result: a JSON line with --json, else a readable line (``command: key value, …``)."""
    if _JSON:
        print(json.dumps(obj, sort_keys=False, default=str), flush=True)
        return
    head = obj.get("command") or obj.get("stage") or obj.get("pipeline") or "result"
    rest = ", ".join(f"{k.replace('_', ' ')} {_human(v)}" for k, v in obj.items()
                     if k not in ("command", "stage", "pipeline"))
    print(f"{head}: {rest}", flush=True)


def _human(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} {_human(x)}" for k, x in v.items()) + "}"
    return str(v)


def _check_io(a: argparse.Namespace, outputs: dict[str, str | None], **inputs: str | None) -> None:
    """Outputs never land on, inside or around what the command reads (the cache, its data, the
    test set, id files), with or without --overwrite: refused before anything is computed."""
    from . import api
    reads = dict(api.cache_inputs(a.cache, getattr(a, "data", None)))
    reads.update({f"--{k.replace('_', '-')}": v for k, v in inputs.items()})
    api.check_outputs(outputs, reads)


def cmd_train(a: argparse.Namespace) -> dict:
    from . import api
    api.check_outputs({"--cache": a.cache}, {"--data": a.data})
    t0 = time.perf_counter()
    cache = api.fit(a.data, a.cache, model=a.model, hidden=a.hidden, optimizer=a.optimizer, steps=a.steps,
                    lr=a.lr, milestones=a.lr_milestones, gamma=a.lr_gamma,
                    batch_size=a.batch_size, l2=a.l2, seed=a.seed, dtype=a.dtype, n_classes=a.classes,
                    device=a.device, shard_steps=a.shard_steps,
                    shard_bytes=int(a.shard_mb * 2**20) if a.shard_mb else None, storage_dtype=a.storage_dtype,
                    mmap_features=a.mmap_features)
    m = cache.manifest
    return {"command": "train", "cache": cache.uri, "seconds": round(time.perf_counter() - t0, 3),
            "steps": cache.steps, "p": cache.model.p, "shards": len(m.shards), "bytes": m.shard_bytes}


def _change_summary(a: argparse.Namespace) -> dict:
    return {"delete": a.delete, "add": a.add}


def cmd_unlearn(a: argparse.Namespace) -> dict:
    from . import api
    _check_io(a, {"--out": a.out, "--out-cache": a.out_cache}, delete=a.delete, add=a.add)
    api.check_new_output(a.out, a.overwrite)
    cfg = _deltagrad_config(a)
    cache = api.open_cache(a.cache)
    t0 = time.perf_counter()
    res = api.unlearn(cache, delete=a.delete, add=a.add, config=cfg, data=a.data, device=a.device,
                      out_cache=a.out_cache)
    seconds = time.perf_counter() - t0
    meta = {"method": "deltagrad", "cache": cache.uri, "cache_run_id": cache.manifest.run_id,
            "config": cfg.to_dict(),
            **_change_summary(a), **res.diagnostics()}
    api.save_model(a.out, cache.model, res.params, metadata=meta, overwrite=a.overwrite)
    _warn_accuracy(cfg, cache, [res.prediction_error_mean])
    out = {"command": "unlearn", "out": a.out, "seconds": round(seconds, 3), **res.diagnostics()}
    if a.out_cache:
        out["out_cache"] = a.out_cache
    return out


def _warn_accuracy(cfg, cache, prediction_errors) -> None:
    """One stderr line when the explicit steps saw the L-BFGS model predict poorly, or the schedule
    left long stretches unmeasured (every command that replays); ``cfg`` as the replay resolved it
    for ``cache``'s trajectory."""
    from .api import accuracy_warning
    cfg = cfg.resolve(full_batch=cache.plan.full_batch, kind=cache.spec.kind)
    why = accuracy_warning(cfg, cache.steps, [float(e) for e in prediction_errors])
    if why:
        print(f"warning: {why}", file=sys.stderr)


def _warn_replays(a: argparse.Namespace, fan, report, ids=None) -> None:
    """After a fan-out: a run where every request failed is an error (exit 2, the first reasons);
    some failed: one warning line; then the accuracy warning of the replays that succeeded."""
    from .api import InputError, as_cache
    n, errors = len(report.counters["explicit_steps"]), report.errors
    shown = "; ".join(f"{'id ' + str(int(ids[i])) if ids is not None else 'request ' + str(i)}: {e}"
                      for i, e in list(errors.items())[:2])
    if errors and len(errors) == n:
        raise InputError(f"all {n} replays failed, e.g. {shown}")
    if errors:
        print(f"warning: {len(errors)} of {n} replays failed (NaN params and the reason in the 'error' column "
              f"of --out), e.g. {shown}", file=sys.stderr)
    pred = report.stats.get("prediction_error_mean")
    ok = [float(pred[i]) for i in range(n) if i not in errors] if pred is not None else []
    _warn_accuracy(fan.config, as_cache(a.cache), ok)


def cmd_retrain(a: argparse.Namespace) -> dict:
    from . import api
    _check_io(a, {"--out": a.out}, delete=a.delete, add=a.add)
    api.check_new_output(a.out, a.overwrite)
    cache = api.open_cache(a.cache)
    t0 = time.perf_counter()
    params = api.retrain_exact(cache, delete=a.delete, add=a.add, data=a.data, device=a.device)
    seconds = time.perf_counter() - t0
    meta = {"method": "exact-retrain", "cache": cache.uri, "cache_run_id": cache.manifest.run_id,
            **_change_summary(a)}
    api.save_model(a.out, cache.model, params, metadata=meta, overwrite=a.overwrite)
    return {"command": "retrain", "out": a.out, "seconds": round(seconds, 3), "steps": cache.steps,
            "explicit_steps": cache.steps, "approx_steps": 0, "fallbacks": 0}


def cmd_evaluate(a: argparse.Namespace) -> dict:
    from . import api
    return {"command": "evaluate", "model": a.model, "data": a.data, **api.evaluate(a.model, a.data)}


def _data_shards(text: str) -> int | str:
    if text == "auto":
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"expected 'auto' or a count >= 0, got {text!r}")


def _fanout(a: argparse.Namespace):
    """The Fanout of a many-request command; results are kept incrementally next to --out."""
    import torch

    from .many import Fanout, backend
    from .progress import bar
    cfg = _deltagrad_config(a)
    gemm = getattr(torch, a.gemm_dtype) if a.gemm_dtype else None
    be = backend(a.backend, address=a.address, workers=a.workers, mode=a.mode, num_cpus=a.num_cpus,
                 num_gpus=a.num_gpus, device="cuda" if a.num_gpus else "cpu", data_shards=a.data_shards,
                 max_model_mb=a.max_model_mb, connect_timeout_s=a.connect_timeout)
    progress = bar(a.command)
    return Fanout(backend=be, batch_size=a.batch_size, config=cfg, gemm_dtype=gemm, parts=a.out + ".parts",
                  progress=progress), progress


def _check_many_io(a: argparse.Namespace) -> None:
    """--out and its incremental parts never over the cache, its data, the test set or the ids."""
    _check_io(a, {"--out": a.out, "--out's parts": a.out + ".parts"}, test=getattr(a, "test", None), ids=a.ids)


def _ids_arg(a: argparse.Namespace):
    from .api import read_ids
    return read_ids(a.ids) if a.ids else None


def _fan_command(a: argparse.Namespace, compute) -> dict:
    """A many-request command: checks, the fan-out, the result's table to --out (its metadata in the
    file), the summary line. ``compute(fanout)`` returns a typed result (:mod:`deltagrad_ray.many`)."""
    from .api import check_new_output
    from .results import write_table
    _check_many_io(a)
    check_new_output(a.out, a.overwrite)
    fan, progress = _fanout(a)
    t0 = time.perf_counter()
    res = compute(fan)
    _warn_replays(a, fan, res.replay, res.request_ids)
    # models beyond --max-model-mb are streamed from the parts into --out a row group at a time
    meta = res.metadata() if hasattr(res, "metadata") else None
    write_table(a.out, res.table(), metadata=meta, overwrite=a.overwrite)
    progress.close()
    fan.discard_parts()  # the final file is written: the incremental parts are no longer needed
    out = {"command": a.command, "out": a.out, "seconds": round(time.perf_counter() - t0, 3), **res.summary()}
    if res.verification is not None and not _JSON:
        out["verification"] = res.verification.statement()
    return out


def cmd_loo(a: argparse.Namespace) -> dict:
    from . import many
    return _fan_command(a, lambda fan: many.loo(a.cache, _ids_arg(a), fanout=fan, data=a.data, verify=a.verify,
                                                 exact_above=a.exact_above))


def cmd_jackknife(a: argparse.Namespace) -> dict:
    from . import many
    return _fan_command(a, lambda fan: many.jackknife(a.cache, a.test, _ids_arg(a), fanout=fan, data=a.data,
                                                       memory_mb=a.memory_mb, verify=a.verify,
                                                       exact_above=a.exact_above))


def cmd_influence(a: argparse.Namespace) -> dict:
    from . import many
    return _fan_command(a, lambda fan: many.influence(a.cache, a.test, _ids_arg(a), fanout=fan, data=a.data,
                                                       memory_mb=a.memory_mb, verify=a.verify,
                                                       exact_above=a.exact_above))


def cmd_conformal(a: argparse.Namespace) -> dict:
    from . import many
    return _fan_command(a, lambda fan: many.conformal(a.cache, a.test, a.alpha, method=a.method, folds=a.folds,
                                                       ids=_ids_arg(a), seed=a.seed, fanout=fan, data=a.data,
                                                       memory_mb=a.memory_mb, verify=a.verify))


def cmd_make_data(a: argparse.Namespace) -> dict:
    from .api import write_dataset
    from .datasets import make_dataset
    data = make_dataset(a.kind, n=a.n, d=a.d, n_classes=a.classes, seed=a.seed, dtype=a.dtype)
    loc = write_dataset(data, a.out, overwrite=a.overwrite)
    return {"command": "make-data", "out": loc.uri, "rows": len(data), "features": data.n_features}


def cmd_demo(a: argparse.Namespace) -> dict:
    import datetime as _dt

    from .demo import run_demo
    out = a.out or f"demo-output/{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return run_demo(out, n=a.n, d=a.d, steps=a.steps, emit=_emit)


def _fleet(a: argparse.Namespace):
    """(targets, inbox, retention) of ``--config`` or ``--output``."""
    from .erasure import Target
    if getattr(a, "config", None):
        from .jobs.bulk_erasure import SCHEMA, fleet_of
        from .jobs.config import configure, load
        cfg = load(a.config, SCHEMA)
        configure(cfg)
        fleet = fleet_of(cfg)
        return list(fleet.models), a.requests or fleet.requests, fleet.settings.retention
    outs = a.output if isinstance(a.output, list) else [a.output]
    return [Target.for_output(o) for o in outs], a.requests, None


def cmd_erasure(a: argparse.Namespace) -> dict:
    from . import erasure
    from .api import InputError, StorageError
    cmd = a.erasure_command
    if cmd == "publish":
        rec = erasure.publish_initial(a.cache, a.output)
        return {"command": "erasure publish", "output": a.output, "version": rec.version, "cache": a.cache}
    if cmd in ("abandon", "repair"):
        try:
            if cmd == "repair":
                out = erasure.repair(a.output, lease=erasure.LeaseSettings(wait_s=a.wait))
                return {"command": "erasure repair", "output": a.output, **out}
            audit = erasure.abandon(a.run_id, a.output, reason=a.reason, lease=erasure.LeaseSettings(wait_s=a.wait))
        except erasure.LeaseBusy as e:
            raise StorageError(f"{e}; retry later or with --wait SECONDS") from None
        return {"command": "erasure abandon", "run_id": a.run_id, "output": a.output,
                "returned_to_pending": audit["requests"]["returned_to_pending"], "reason": a.reason}
    targets, inbox, retention = _fleet(a)
    if cmd == "prune":
        from .erasure.retention import RetentionSettings, prune_outputs
        settings = RetentionSettings(a.days) if a.days is not None else retention
        if settings is None:
            raise InputError("no retention given: pass --days D or set retention.superseded_days in the config")
        res = prune_outputs([t.output for t in targets], settings, dry_run=a.dry_run)
        for t, (uri, r) in zip(targets, res.items()):
            _emit({"command": "erasure prune", "model": t.name, "output": uri, **_pruned(r)})
        bad = [r["error"] for r in res.values() if "error" in r]
        if bad:
            raise StorageError(bad[0])
        return {"command": "erasure prune", "models": len(targets), "dry_run": a.dry_run}
    if cmd == "trace":
        rec = erasure.trace(targets, data_id=a.data_id, request_id=a.request_id, inbox=inbox, retention=retention)
        if _JSON:
            return {"command": "erasure trace", **rec}
        for r in rec["models"]:
            _emit({"command": "erasure trace", **_receipt(r)})
        errors = [r["error"] for r in rec["models"] if "error" in r]
        if errors:
            raise StorageError(errors[0])
        return {"command": "erasure trace", "data_ids": rec["data_ids"], "models": len(targets),
                "gone_everywhere": "yes" if rec["gone_everywhere"] else "no"}
    rows = erasure.status(targets, inbox)
    if _JSON:
        for st in rows:
            _emit({"command": "erasure status", **st})
    else:
        for st in rows:
            _emit(_status_line(st))
    errors = [st["error"] for st in rows if "error" in st]
    if errors:
        raise StorageError(errors[0])
    return {"command": "erasure status", "models": len(rows)}


def _pruned(r: dict) -> dict:
    if "error" in r:
        return {"error": r["error"]}
    return {"deleted": ", ".join(f"version {d['version']}" if "version" in d else f"run {d['run_id']}"
                                 for d in r["deleted"]) or "nothing",
            "kept": ", ".join(f"version {k['version']} until {k['until']}" for k in r["kept"]) or "none",
            "outside_prefix": ", ".join(f"version {o['version']} at {o['cache']}" for o in r["outside"]) or "none"}


def _receipt(r: dict) -> dict:
    out = {"model": r["model"], "data_id": r["data_id"]}
    if "error" in r:
        return {**out, "error": r["error"]}
    if not r.get("held"):
        return {**out, "held": "no" if r.get("held") is False else r.get("note", "unknown")}
    e = r.get("erased")
    out["held"] = "yes"
    out["erased"] = "no" if e is None else (f"in version {e['version']} ({e['method']}, run {e['run_id']}, "
                                            f"{e['published']}, request {', '.join(map(str, e['requests'])) or '—'})")
    out["latest_holds"] = "yes" if r.get("latest_holds") else "no"
    def until(v: dict) -> str:
        u = v.get("until")
        return "" if not u else f" ({u})" if u.startswith("kept") else f" (until {u})"
    out["survives_in"] = ", ".join(f"version {v['version']}{until(v)}" for v in r.get("versions", [])
                                   if v.get("holds")) or "no version"
    tdh = r.get("training_data_holds")
    out["training_data_holds"] = "yes" if tdh is True else "no" if tdh is False else tdh
    return out


def _status_line(st: dict) -> dict:
    out = {"command": "erasure status", "model": st["model"], "output": st["output"]}
    if "error" in st:
        return {**out, "error": st["error"]}
    pub, lease = st["published"], st["lease"]
    fail = st.get("last_failure")
    return {**out,
            "published": "none" if pub is None else f"version {pub['version']} (run {pub['run_id']}, {pub['method']})",
            "lineage": " <- ".join(str(v["version"]) for v in st["lineage"]) or "none",
            "open_plans": ", ".join(f"{p['run_id']} (version {p['version']}, {p['requests']} requests, {p['state']})"
                                    for p in st["open_plans"]) or "none",
            "lease": "never taken" if lease is None else (f"held by {lease['holder']} until {lease['expires']}"
                                                         if lease["live"] else f"free (last {lease['holder']})"),
            "pending": "unknown (give --requests)" if st["pending"] is None else st["pending"],
            "last_failure": "none" if fail is None else f"{fail['at']}: {fail['kind']}: {fail['message']}",
            "ignored_ledger_entries": len(st.get("ignored_ledger_entries", []))}


def cmd_config_schema(a: argparse.Namespace) -> None:
    """Prints the schema itself (JSON, whatever --json says): ``deltagrad-ray config-schema JOB > job.schema.json``."""
    from .jobs import config_schema
    print(json.dumps(config_schema(a.job), indent=2), flush=True)


COMMANDS = {"config-schema": cmd_config_schema, "train": cmd_train, "unlearn": cmd_unlearn, "retrain": cmd_retrain,
            "evaluate": cmd_evaluate, "loo": cmd_loo, "jackknife": cmd_jackknife, "influence": cmd_influence,
            "conformal": cmd_conformal, "make-data": cmd_make_data, "erasure": cmd_erasure, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (see the module docstring).

    Called without ``argv`` (as the ``deltagrad-ray`` command, or ``python -m deltagrad_ray.cli``)
    it ends the process itself with that code (:func:`deltagrad_ray.runtime.end`: Ray shut down,
    output flushed, no interpreter teardown, which could abort the process with exit 134), and
    SIGTERM interrupts it like Ctrl-C (partial outputs removed, exit 130).

    Args:
      argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
      The exit code (only when ``argv`` is given).
    """
    if argv is not None:
        return _main(argv)
    from .runtime import run_to_end
    run_to_end(lambda: _main(None))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    global _JSON
    _JSON = args.json
    from .api import configure_s3
    from .runtime import report_failure
    try:
        with _user_warnings():
            configure_s3(endpoint=args.endpoint_url, profile=args.profile, region=args.region)
            out = COMMANDS[args.command](args)
            if out is not None:  # config-schema prints its own JSON document
                _emit(out)
        return EXIT_OK
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as raised:  # noqa: BLE001 - every failure ends with its documented code
        debug = args.debug or environment.debug()   # a bug: the traceback on request
        return report_failure(raised, show_traceback=debug,
                              hint="" if debug else " (rerun with --debug for the traceback)")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class _user_warnings:
    """While a command runs: the library's :class:`~deltagrad_ray.api.DataWarning` warnings and its
    log records (``deltagrad_ray`` logger, e.g. partial files removed after a failure) as one
    ``warning: …`` line each on stderr; both restored afterwards."""

    def __enter__(self):
        import logging
        import warnings

        from .api import DataWarning
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, DataWarning):
                print(f"warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.filterwarnings("always", category=DataWarning)  # part of the command's output
        self._log = logging.getLogger("deltagrad_ray")
        self._handler = logging.StreamHandler(sys.stderr)
        self._handler.setFormatter(logging.Formatter("warning: %(message)s"))
        self._handler.setLevel(logging.WARNING)
        self._propagate = self._log.propagate
        self._log.addHandler(self._handler)
        self._log.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        self._log.removeHandler(self._handler)
        self._log.propagate = self._propagate
        self._warnings.__exit__(*exc)


if __name__ == "__main__":
    main()
