"""The Python API over storage: train into a cache, unlearn, retrain exactly, evaluate.

The CLI calls exactly these functions, so a notebook and a shell session share one code path.
It also carries what the CLI needs from the lower layers, so the CLI imports no ``store``,
``core`` or ``distributed`` module (docs/architecture.md): the settings (:class:`DeltaGradConfig`),
the errors (:class:`InputError`, :class:`StorageError`), id lists and data sets (:func:`read_ids`,
:func:`write_dataset`), model files (:func:`save_model`) and the S3 settings (:func:`configure_s3`).

Example (``data.parquet`` as written by ``deltagrad-ray make-data``)::

    from deltagrad_ray import api
    cache = api.fit("data.parquet", "runs/c1", model="logreg", steps=120, lr=0.1, l2=0.005)
    res = api.unlearn(cache, delete=[3, 14, 15])          # DeltaGrad
    exact = api.retrain_exact(cache, delete=[3, 14, 15])  # the ground truth
    float((res.params - exact).norm())
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence

import torch

from .core.data import ChangeSet, Dataset, make_change_set, validate
from .core.errors import InputError
from .core.models import ModelSpec
from .core.config import DeltaGradConfig, training_dtype
from .core.replay import ReplayResult, deltagrad
from .core.schedule import learning_rates
from .core.train import retrain, train
from .core.schedule import BatchPlan
from .store.cache import Cache, open_cache
from .store.cache_format import ROW_DIGESTS, dtype_name
from .store.cache_writer import CacheWriter, added_rows_file, check_new_cache, removed_rows_file, row_digest_file
from .store.manifest import DataRef, ParentRef, Training
from .store.datasets import (feature_copy, fingerprint, id_tensor, read_dataset, read_ids, write_dataset,
                             write_feature_copy)
from .store.inputs import as_dataset, in_project_layout, is_location
from .store.location import Location, StorageError, location, overlap
from .store.models import load_model, save_model as save_model
from .store.registry import open_resolved, resolve_cache
from .store.s3 import configure_s3 as configure_s3  # re-exported for the CLI (module docstring)

log = logging.getLogger("deltagrad_ray")


class DataWarning(UserWarning):
    """Something in the data that is probably a mistake, though it can be trained on (the CLI
    prints it as one ``warning: …`` line)."""


def check_device(device: str | torch.device) -> torch.device:
    """The torch device ``device`` names, if this machine has it; else an :class:`InputError`.

    Args:
      device: ``cpu``, ``cuda``, ``cuda:N`` (or a ``torch.device``).

    Returns:
      The ``torch.device``.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device}: CUDA is not available on this machine (no GPU, or torch "
                             f"{torch.__version__} was built without CUDA); use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise InputError(f"device {device}: this machine has {n} CUDA device(s), cuda:0 … cuda:{n - 1}")
    elif dev.type != "cpu":
        raise InputError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    return dev


def _dtype(name: str | torch.dtype) -> torch.dtype:
    return training_dtype(name)


def _n_classes(data: Dataset, kind: str, n_classes: int | None) -> int:
    if kind == "linear":
        return 1
    if n_classes is not None:
        return n_classes
    c = max(2, int(data.y.max()) + 1)
    _warn_classes(data.y, c)
    return c


def _warn_classes(y: torch.Tensor, c: int) -> None:
    """Classes counted from the largest label: warn (:class:`DataWarning`) when some of them have no
    row, or a single one: most likely a stray label that added classes, not a class to learn."""
    counts = torch.bincount(y.cpu().clamp(min=0), minlength=c)[:c]
    odd = torch.nonzero(counts <= 1).reshape(-1).tolist()
    if not odd:
        return
    shown = ", ".join(f"{k}: {int(counts[k])}" for k in odd[:8]) + (f", … ({len(odd)} in all)" if len(odd) > 8 else "")
    warnings.warn(DataWarning(
        f"the labels give {c} classes (0 … {c - 1}, from the largest label), but {len(odd)} of them have at most "
        f"one row (class: rows {shown}); is a label wrong? Give the number of classes (--classes / n_classes) "
        "if they are meant to be there"), stacklevel=4)


def fit(data, cache: str | Location, *, model: str = "logreg", hidden: Sequence[int] = (),
        optimizer: str = "gd", steps: int = 100, lr: float = 0.1, milestones: Sequence[int] = (),
        gamma: float = 0.1, batch_size: int | None = None, l2: float = 0.0, seed: int = 0,
        dtype: str | torch.dtype = "float64", n_classes: int | None = None, device: str = "cpu",
        shard_steps: int | None = None, shard_bytes: int | None = None, storage_dtype: str | None = None,
        y=None, ids=None, mmap_features: bool = False) -> Cache:
    """Train a model on ``data`` and record its trajectory as a cache at ``cache``.

    Args:
      data: a data set location (Parquet: id, label, features), or data in any form
        :func:`~deltagrad_ray.store.inputs.as_dataset` takes (arrays with ``y``, a DataFrame, a pyarrow
        Table, a ``ray.data.Dataset``, other Parquet layouts); those are stored inside the cache
        (``data/part-0.parquet``), so that later replays load and verify them.
      cache: where the cache goes; must not hold a cache already.
      y, ids: labels (class indices 0 … c−1, or float targets) and ids given apart from array features.
      model: ``logreg``, ``linear`` or ``mlp`` (with ``hidden`` sizes).
      optimizer: ``gd`` (full batch) or ``sgd`` (mini-batches of ``batch_size``).
      steps, lr, milestones, gamma: T and the learning-rate schedule (MultiStepLR-like).
      l2: λ of (λ/2)‖θ‖².
      seed: initialisation and batch order.
      dtype: ``float64`` or ``float32``.
      n_classes: classes (default: largest label + 1).
      device: torch device for the computation (the cache is written from the CPU).
      shard_steps, shard_bytes: cache shard size in steps or bytes (default: ~64 MB shards).
      storage_dtype: precision of the stored vectors (``float16``/``bfloat16`` halve the bytes;
        default: the training dtype).
      mmap_features: also write the features as a memory-mappable ``features.npy`` inside the
        (local) cache, which later commands map instead of decoding Parquet (n × d × 8 bytes more
        on disk; the copy is verified against the data's fingerprint at every load).

    Returns:
      The committed :class:`Cache`.
    """
    if optimizer not in ("gd", "sgd"):
        raise InputError(f"optimizer must be gd or sgd, got {optimizer!r}")
    if optimizer == "sgd" and not batch_size:
        raise InputError("optimizer sgd needs a batch size (e.g. --batch-size 256)")
    if optimizer == "gd" and batch_size:
        raise InputError("a batch size applies to sgd only; gd uses every row at every step")
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be an integer >= 1, got {steps!r}")
    dt = _dtype(dtype)
    check_device(device)
    root = location(cache)
    copy = feature_copy(root) if mmap_features else None  # refused before training for a cache on S3
    stored = not (is_location(data) and y is None and ids is None and in_project_layout(data))
    if stored:  # data in memory (or another layout): converted here, stored in the cache below
        task = "regression" if model == "linear" else "classification"
        raw = as_dataset(data, y, ids=ids, task=task, n_classes=n_classes)
        src = root.join("data", "part-0.parquet")
    else:
        src = location(data)
        raw = read_dataset(src, regression=(model == "linear"))
    if len(raw) == 0:
        raise InputError(f"{src.uri if not stored else 'data'}: no rows (an empty data set)")
    spec = ModelSpec(model, raw.n_features, _n_classes(raw, model, n_classes), tuple(hidden))
    validate(raw, n_features=spec.n_features, n_classes=None if model == "linear" else spec.n_classes)
    fp = fingerprint(raw)
    digests = row_digest_file(raw)  # the data may later be rewritten without erased rows: checked row by row
    ds = raw.to(dtype=dt, device=device)
    fm = spec.build()
    lrs = learning_rates(steps, lr, tuple(milestones), gamma)
    plan = BatchPlan(len(ds), batch_size if optimizer == "sgd" else None, seed)
    training = Training(spec, optimizer, float(lr), tuple(int(m) for m in milestones), float(gamma), float(l2),
                        int(seed), plan, steps, dtype_name(dt))
    writer = CacheWriter(root, training, shard_steps=shard_steps, shard_bytes=shard_bytes, storage=storage_dtype)
    try:
        if stored:
            write_dataset(raw, src)
        traj = train(fm, ds, steps=steps, lrs=lrs, l2=l2, batch_size=batch_size if optimizer == "sgd" else None,
                     seed=seed, recorder=writer)
        assert traj.plan == plan, "the recorded plan is the one the manifest states"
        if copy is not None:
            write_feature_copy(raw.X, copy)
        writer.commit(data=DataRef(_portable_uri(src), fp, len(raw), raw.n_features, dtype_name(raw.X.dtype)),
                      n_rows=len(ds), model=fm, initial=traj.initial, final=traj.final,
                      extra_files={ROW_DIGESTS: digests})
    except BaseException:  # failed or interrupted: nothing of the run stays behind
        _abort(writer, ([src] if stored else []) + ([copy] if copy is not None else []))
        raise
    return open_cache(root)


def _abort(writer: CacheWriter, extra: Sequence[Location] = ()) -> None:
    """Remove what a failed or interrupted run wrote (shards, files, ``extra``), saying so on the log."""
    removed = writer.abort(extra)
    if removed:
        log.warning(f"removed the {removed} partial file(s) the failed or interrupted run had written under "
                    f"{writer.root.uri}")


def _portable_uri(loc: Location) -> str:
    """The URI to record: absolute for local paths; for S3 with the settings given explicitly."""
    return loc.portable_uri


def as_cache(cache: Cache | str | Location) -> Cache:
    """An open cache: ``cache`` itself, or the published version of a models prefix."""
    return open_resolved(cache)


def change_set(cache: Cache, data: Dataset, delete: Sequence[int] | torch.Tensor | str | None = None,
               add: Dataset | str | Location | None = None, removed: torch.Tensor | None = None) -> ChangeSet:
    """A validated change set: ``delete`` ids (a list, a tensor, or an id-file location) and/or
    ``add`` rows (a Dataset or a data-set location)."""
    if delete is None and add is None:
        raise InputError("nothing to change: give ids to delete or rows to add")
    ids = None
    if delete is not None:
        ids = read_ids(delete) if isinstance(delete, (str, os.PathLike, Location)) else \
            id_tensor(delete, "ids to delete")
        if len(ids) == 0:  # as leave-one-out refuses it: an empty request is not an erasure
            raise InputError("no ids given")
    if add is not None and not isinstance(add, Dataset):
        add = read_dataset(add, regression=cache.spec.task == "regression")
    return make_change_set(data, delete_ids=ids, add=add, removed=removed, n_classes=cache.n_classes)


PREDICTION_ERROR_WARN = 0.5  # mean L-BFGS prediction error at explicit steps that says "probably inaccurate"


def _unchecked_steps(config: DeltaGradConfig, steps: int) -> int:
    """The longest run of consecutive approximate steps the schedule of ``config`` allows over ``steps``
    (an explicit step measures the L-BFGS approximation; between two, nothing does). For ``adaptive``
    the uniform schedule of the same period (its gaps only shorten); fallbacks only add explicit steps."""
    cfg = config if config.schedule != "adaptive" else DeltaGradConfig.from_dict({**config.to_dict(),
                                                                                  "schedule": "uniform"})
    mask = cfg.explicit_steps(steps).tolist()[1:]  # step 0 needs no gradient: v = 0
    best = run = 0
    for explicit in mask:
        run = 0 if explicit else run + 1
        best = max(best, run)
    return best


def accuracy_warning(config: DeltaGradConfig, steps: int, prediction_errors: Sequence[float] = ()) -> str | None:
    """Why replays with ``config`` over ``steps`` steps are probably inaccurate, or None.

    Two signals: the L-BFGS prediction error measured at explicit steps (each request's mean, above
    :data:`PREDICTION_ERROR_WARN`), and a schedule that leaves long runs of approximate steps that no
    explicit step measures (longer than 20 steps and than a quarter of the run, or than 100 steps: the
    defaults never do) — e.g. ``period=1000`` on 60 steps measures nothing after the burn-in.

    Args:
      config: the DeltaGrad settings.
      steps: T.
      prediction_errors: each replay's mean prediction error (NaN: not known).

    Returns:
      One line for the user, or None.
    """
    advice = ("the result may be inaccurate: try --schedule adaptive, a smaller --period or a longer --history, "
              "and check against `retrain`")
    errs = [float(e) for e in prediction_errors if not math.isnan(float(e))]
    high = [e for e in errs if e > PREDICTION_ERROR_WARN]
    if high:
        where = "" if len(errs) == 1 else f" in {len(high)} of {len(errs)} replays (worst {max(high):.0%})"
        return f"the L-BFGS approximation was {max(high) if len(errs) == 1 else sum(high) / len(high):.0%} " \
               f"off at explicit steps (mean){where}; {advice}"
    run = _unchecked_steps(config, steps)
    if run > max(20, min(steps // 4, 100)):
        return (f"the schedule ({config.schedule}, period {config.period}) leaves {run} consecutive steps of {steps} "
                f"approximated with no explicit step to measure them; {advice}")
    return None


_TRAIN_ADVICE = "it came from a diverged run: train again with a smaller learning rate (--lr)"


def _finite(params: torch.Tensor, what: str, advice: str = _TRAIN_ADVICE) -> torch.Tensor:
    """``params`` if every value is finite; else an :class:`InputError` naming ``what``."""
    bad = ~torch.isfinite(params)
    if bool(bad.any()):
        raise InputError(f"{what} has {int(bad.sum())} non-finite value(s) (NaN or inf) of {params.numel()}; {advice}")
    return params


_REPLAY_ADVICE = "the replay diverged: check the changed rows' features for extreme values, and `retrain`"


def _checked_cache(c: Cache) -> Cache:
    """The cache, if its θ_0 and θ_T are finite (caches written before training checked for divergence
    may hold a NaN model)."""
    _finite(c.final, f"the model of the cache {c.uri}")
    _finite(c.initial, f"θ_0 of the cache {c.uri}")
    return c


def cache_inputs(cache: str | Location, data: str | Location | None = None) -> dict[str, Location]:
    """What a command on ``cache`` reads, by the name messages give it: the cache location as given,
    the cache it resolves to (a models prefix gives its published version) and the training data
    (``data``, else the location the manifest records).

    Returns:
      name → location, for :func:`check_outputs`.
    """
    root = resolve_cache(cache)
    c = open_cache(root)
    given = location(cache)
    out = {"--cache": given}
    if overlap(root, given) != "is":
        out["its published cache"] = root
    out["--data" if data is not None else "the cache's data"] = c.data_location(data)
    return out


def check_outputs(outputs: dict[str, str | Location | None], inputs: dict[str, str | Location | None]) -> None:
    """Refuse outputs that are, lie inside, or contain a location the command reads (a cache, its
    data, a test set, an id file): an output there could destroy it, with or without overwriting.

    Args:
      outputs: name (as shown, e.g. ``--out``) → location; None entries are skipped.
      inputs: name → location read.

    Raises:
      InputError: naming the output and the input it would land on.
    """
    for oname, out in outputs.items():
        if out is None:
            continue
        o = location(out)
        for iname, inp in inputs.items():
            if inp is None:
                continue
            i = location(inp)
            how = overlap(o, i)
            if how is not None:
                where = {"is": "is the same location as", "inside": "lies inside", "contains": "contains"}[how]
                raise InputError(f"{oname} {o.uri} {where} {iname} {i.uri}, which this command reads; "
                                 "write outputs elsewhere")


def check_new_output(path: str | Location, overwrite: bool, name: str = "--out") -> None:
    """Refuse, before anything is computed, an output that exists when it may not be replaced.

    Args:
      path: the output's location.
      overwrite: whether an existing file may be replaced.
      name: how messages name the output (the CLI's flag).

    Raises:
      StorageError: naming the location and how to proceed.
    """
    loc = location(path)
    if not overwrite and loc.exists():
        raise StorageError(f"{loc.uri}: already exists; pass --overwrite or choose another {name}")


def unlearn(cache: Cache | str | Location, *, delete=None, add=None, config: DeltaGradConfig | None = None,
            data: str | Location | None = None, device: str = "cpu", out_cache: str | Location | None = None,
            note: dict | None = None) -> ReplayResult:
    """DeltaGrad: the model after deleting ``delete`` ids and/or adding ``add`` rows.

    With ``out_cache``, the replayed path is also written, as it is computed, as a new cache at
    that location (a new prefix: the original is never touched), so that later changes start
    from it (online mode across processes). ``note`` is stored in the new cache's change log.

    Returns a :class:`ReplayResult` (``params``, ``explicit_steps``, ``fallbacks``, …).
    """
    c, out, ds, traj, change = _opened_change(cache, delete, add, data, device, out_cache)
    cfg = config or DeltaGradConfig()
    if out is None:
        res = deltagrad(c.model, traj, ds, change, cfg)
        _finite(res.params, "the replayed model", _REPLAY_ADVICE)
        return res
    writer = _derived_writer(c, out)
    try:
        res = deltagrad(c.model, traj, ds, change, cfg, recorder=writer)
        _finite(res.params, "the replayed model", _REPLAY_ADVICE)
        write_derived_cache(c, writer, res, ds, change, cfg, note)
    except BaseException:  # failed or interrupted: no orphan shards in the new location
        _abort(writer)
        raise
    return res


def _opened_change(cache, delete, add, data, device: str, out_cache) -> tuple:
    """What a replay or a retraining of one change starts from, every input checked before any
    work: (the cache, the new cache's location or None, the data on ``device``, the trajectory,
    the change set)."""
    check_device(device)
    c = _checked_cache(as_cache(cache))
    out = None if out_cache is None else _new_cache_location(c, out_cache, data)
    ds = c.data(data, device=device)
    traj = c.trajectory(device)
    return c, out, ds, traj, change_set(c, ds, delete, add, traj.removed)


def _new_cache_location(parent: Cache, out_cache: str | Location, data: str | Location | None) -> Location:
    """Where a derived cache goes: a new location, not over or inside the cache or its data."""
    out = location(out_cache)
    if overlap(out, parent.root) is not None:
        raise InputError(f"{out.uri}: the new cache must go to a new location, not over or inside the cache it "
                         "comes from")
    check_outputs({"the new cache": out}, {"the data": parent.data_location(data)})
    check_new_cache(out)  # before the data is read and anything replayed
    return out


def _derived_writer(parent: Cache, out: Location) -> CacheWriter:
    """A writer for a cache derived from ``parent``: the same run and row groups, shards no larger
    than the parent's and small enough to be written while the replay runs (``overlap``)."""
    m = parent.manifest
    return CacheWriter(out, m.training, shard_steps=m.shard_steps, overlap=True, storage=parent.storage,
                       row_group_steps=m.row_group_steps)


def write_derived_cache(parent: Cache, writer: CacheWriter, res: ReplayResult, data: Dataset, change: ChangeSet,
                        config: DeltaGradConfig, note: dict | None) -> Cache:
    """Commit the cache a recorded replay wrote: the parent's settings, the rows it has now
    (removed.parquet, added.parquet) and a log of the changes that led to it."""
    new = res.trajectory
    n_orig = parent.manifest.data.n
    files = {}
    if ROW_DIGESTS in parent.manifest.files:  # the same training rows: derived caches check rewritten data too
        files[ROW_DIGESTS] = parent._row_file(ROW_DIGESTS)
    rows = torch.zeros(0, dtype=torch.int64)
    if new.removed is not None:
        rows = torch.nonzero(new.removed).reshape(-1).cpu()
    if len(rows):  # deletions only ever remove rows the data already had
        files["removed.parquet"] = removed_rows_file(rows, data.ids.cpu()[rows])
    all_rows = len(data) + (len(change.add) if change.add is not None else 0)
    if all_rows > n_orig:
        from .core.data import concat
        full = concat(data, change.add) if change.add is not None else data
        files["added.parquet"] = added_rows_file(full.rows(torch.arange(n_orig, all_rows)))
    entry = {"run_id": writer.run_id, "deleted": int(len(change.delete)),
             "added": int(len(change.add)) if change.add is not None else 0,
             "config": config.to_dict(), **res.diagnostics(), **(note or {})}
    writer.commit(data=parent.manifest.data, n_rows=all_rows, model=parent.model, initial=new.initial,
                  final=new.final, parent=ParentRef(parent.root.portable_uri, parent.manifest.run_id),
                  changes=(*parent.manifest.changes, entry), extra_files=files)
    return open_cache(writer.root)



def retrain_exact(cache: Cache | str | Location, *, delete=None, add=None, data: str | Location | None = None,
                  device: str = "cpu", out_cache: str | Location | None = None, note: dict | None = None
                  ) -> torch.Tensor:
    """Exact retraining after the change: same θ_0, learning rates and batch order.

    With ``out_cache``, the retrained path is recorded as a new cache there (as :func:`unlearn`
    does for DeltaGrad), e.g. to publish an exactly retrained version.
    """
    c, out, ds, traj, change = _opened_change(cache, delete, add, data, device, out_cache)
    if out is None:
        return retrain(c.model, traj, ds, change)
    from .core.train import changed_trajectory
    writer = _derived_writer(c, out)
    try:
        final = retrain(c.model, traj, ds, change, recorder=writer)
        path = changed_trajectory(traj, ds, change, final, writer)
        res = ReplayResult(final, traj.steps, traj.steps, 0, 0, 0, path)
        write_derived_cache(c, writer, res, ds, change, DeltaGradConfig(),
                            {**(note or {}), "method": "exact-retrain"})
    except BaseException:  # failed or interrupted: no orphan shards in the new location
        _abort(writer)
        raise
    return final


def training_curve(cache: Cache | str | Location, points: int = 50, rows: int = 5000,
                   data: str | Location | None = None) -> tuple[list[int], list[float]]:
    """The objective (mean loss + (λ/2)‖θ‖²) at the cached θ_t of ~``points`` steps, on up to
    ``rows`` training rows (a seeded subsample) — read from the cache, nothing is retrained.
    Rows earlier changes removed are left out: the cached path was trained without them."""
    c = as_cache(cache)
    ds = c.data(data)
    removed = c.removed_mask()
    if removed is not None:  # (a data set rewritten without them holds only placeholders for them)
        ds = ds.rows(torch.nonzero(~removed).reshape(-1))
    if len(ds) > rows:
        ds = ds.rows(torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:rows])
    every = max(1, c.steps // points)
    steps, losses = [], []
    with torch.no_grad():
        for seg in c.trajectory().segments():
            for i in range(0, seg.stop - seg.start):
                t = seg.start + i
                if t % every == 0:
                    th = seg.params[i]
                    obj = c.model.loss_sum(th, ds.X, ds.y) / len(ds) + c.l2 / 2 * (th @ th)
                    steps.append(t)
                    losses.append(float(obj))
    th = c.final
    steps.append(c.steps)
    losses.append(float(c.model.loss_sum(th, ds.X, ds.y) / len(ds) + c.l2 / 2 * (th @ th)))
    return steps, losses


def evaluate(model: str | Location, data: str | Location) -> dict:
    """Accuracy and mean loss (classification) or MSE and loss (regression) of a model file on data."""
    fm, theta, _ = load_model(model)
    _finite(theta, f"the model {location(model).uri}")
    ds = read_dataset(data, regression=fm.task == "regression")
    validate(ds, n_features=fm.spec.n_features if fm.spec else None, n_classes=fm.n_classes, what=str(data))
    ds = ds.to(dtype=theta.dtype)
    out = fm.evaluate(theta, ds.X, ds.y)
    bad = [k for k, v in out.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise InputError(f"the model {location(model).uri} gives a non-finite {bad[0]} on {location(data).uri} "
                         "(its parameters are too large for these features: a diverged run?)")
    return {"n": len(ds), **out}
