"""Result tables: tensors and lists to a Parquet file at any location (vectors as fixed-size lists)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch

from .store.datasets import table_bytes
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
                overwrite: bool = False) -> Location:
    """Write columns (tensors: 1-D → scalars, 2-D+ → fixed-size lists; lists → list columns) as one
    Parquet file, atomically; ``metadata`` goes into the schema as JSON under ``deltagrad_ray``."""
    table = pa.table({k: _column(v) for k, v in columns.items()})
    if metadata:
        table = table.replace_schema_metadata({"deltagrad_ray": json.dumps(metadata, sort_keys=True)})
    loc = location(uri)
    loc.write_bytes(table_bytes(table), overwrite=overwrite)
    return loc


def read_table(uri: str | Location) -> tuple[pa.Table, dict]:
    import pyarrow.parquet as pq
    loc = location(uri)
    table = pq.read_table(pa.BufferReader(loc.read_buffer()))
    meta = (table.schema.metadata or {}).get(b"deltagrad_ray")
    return table, (json.loads(meta) if meta else {})
