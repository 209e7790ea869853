"""Result tables as Parquet files at any location: tensors and lists as columns (vectors as
fixed-size lists), the run's metadata as JSON in the schema."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .datasets import arrow_array, parquet_table, table_bytes
from .location import Location, location


def _column(values) -> pa.Array:
    if isinstance(values, torch.Tensor):
        if values.ndim == 1:
            return arrow_array(values)
        flat = values.detach().cpu().numpy().reshape(values.shape[0], -1)
        return pa.FixedSizeListArray.from_arrays(arrow_array(flat.reshape(-1)), flat.shape[1])
    if isinstance(values, np.ndarray):
        return arrow_array(values)
    return pa.array(values)


def write_table(uri: str | Location, columns: dict, *, metadata: dict | None = None,
                overwrite: bool = False, chunk_bytes: int = 64 << 20) -> Location:
    """Write columns (tensors: 1-D → scalars, 2-D+ → fixed-size lists; lists → list columns) as one
    Parquet file, atomically; ``metadata`` goes into the schema as JSON under ``deltagrad_ray``.

    A column may be a :class:`~deltagrad_ray.stats.ModelTable` (models too many to hold, e.g. kept in
    a fan-out's result parts): it is written a row group of about ``chunk_bytes`` at a time, through
    a local temporary file, so memory stays at one chunk whatever the table's size.
    """
    from ..stats.tables import ModelTable
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
    """A table :func:`write_table` wrote, and the metadata it stored (``{}`` if none)."""
    loc = location(uri)
    table = parquet_table(loc.read_buffer())
    meta = (table.schema.metadata or {}).get(b"deltagrad_ray")
    return table, (json.loads(meta) if meta else {})
