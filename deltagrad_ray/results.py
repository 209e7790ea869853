"""Result tables: tensors and lists to a Parquet file at any location (vectors as fixed-size lists)."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .store.datasets import parquet_table, table_bytes
from .store.location import Location, location


def _column(values) -> pa.Array:
    if isinstance(values, torch.Tensor):
        a = values.detach().cpu().numpy()
        if a.ndim == 1:
            return pa.array(a)
        flat = a.reshape(a.shape[0], -1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    if isinstance(values, np.ndarray):
        return pa.array(values)
    return pa.array(values)


def write_table(uri: str | Location, columns: dict, *, metadata: dict | None = None,
                overwrite: bool = False, chunk_bytes: int = 64 << 20) -> Location:
    """Write columns (tensors: 1-D → scalars, 2-D+ → fixed-size lists; lists → list columns) as one
    Parquet file, atomically; ``metadata`` goes into the schema as JSON under ``deltagrad_ray``.

    A column may be a :class:`~deltagrad_ray.stats.ModelTable` (models too many to hold, e.g. kept in
    a fan-out's result parts): it is written a row group of about ``chunk_bytes`` at a time, through
    a local temporary file, so memory stays at one chunk whatever the table's size.
    """
    from .stats.tables import ModelTable
    streamed = [k for k, v in columns.items() if isinstance(v, ModelTable)]
    meta = {"deltagrad_ray": json.dumps(metadata, sort_keys=True)} if metadata else None
    loc = location(uri)
    if not streamed:
        table = pa.table({k: _column(v) for k, v in columns.items()})
        loc.write_bytes(table_bytes(table.replace_schema_metadata(meta)), overwrite=overwrite)
        return loc
    if len(streamed) > 1:
        raise ValueError(f"at most one streamed column, got {streamed}")
    name = streamed[0]
    models = columns[name]
    rows = max(1, chunk_bytes // max(1, models.p * 8))
    fixed = {k: _column(v) for k, v in columns.items() if k != name}
    with tempfile.TemporaryDirectory(prefix="deltagrad-table-") as tmp:
        path = os.path.join(tmp, "table.parquet")
        writer = None
        for start, block in models.chunks(rows):
            cols = {k: (_column(block) if k == name else fixed[k][start:start + len(block)]) for k in columns}
            batch = pa.table(cols).replace_schema_metadata(meta)
            if writer is None:
                writer = pq.ParquetWriter(path, batch.schema)
            writer.write_table(batch)
        if writer is None:
            raise ValueError(f"column {name!r} has no rows")
        writer.close()
        with pa.memory_map(path) as mm:  # pages come from the file, not from the heap
            loc.write_bytes(mm.read_buffer(), overwrite=overwrite)
    return loc


def read_table(uri: str | Location) -> tuple[pa.Table, dict]:
    loc = location(uri)
    table = parquet_table(loc.read_buffer())
    meta = (table.schema.metadata or {}).get(b"deltagrad_ray")
    return table, (json.loads(meta) if meta else {})


def estimate_columns(report) -> dict:
    """The per-request error estimate of a fan-out (:mod:`~deltagrad_ray.core.certificate`) as table
    columns: ``error_estimate`` (≈ ‖θ_DG − θ_exact‖ / ‖θ_exact − θ_full‖; inf: not certified closer
    than the full model; NaN: failed) and ``error_reliable`` (the estimate rests on a convex loss)."""
    est, rel = report.stats.get("error_estimate"), report.stats.get("error_reliable")
    if est is None:
        return {}
    return {"error_estimate": est, "error_reliable": rel}


def estimate_summary(report) -> dict:
    """Of a fan-out's per-request error estimates: the median and largest of the requests that have
    one, and how many are reliable (None where no request has a finite estimate: JSON has no inf)."""
    estimate, reliable = report.stats.get("error_estimate"), report.stats.get("error_reliable")
    if estimate is None:
        return {}
    have = estimate[~torch.isnan(estimate)]
    finite = have[torch.isfinite(have)]
    out = {"error_estimate_median": None, "error_estimate_max": None, "error_estimate_finite": int(len(finite)),
           "error_reliable": int(reliable.sum()) if reliable is not None else 0}
    if len(have):
        med, top = float(have.median()), float(have.max())
        out["error_estimate_median"] = float(f"{med:.4g}") if np.isfinite(med) else None
        out["error_estimate_max"] = float(f"{top:.4g}") if np.isfinite(top) else None
    return out
