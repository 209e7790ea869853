"""The trajectory cache's files and their codec: the layout's names, a shard's Parquet encoding
(per-step vectors as fixed-size lists, row groups of whole DeltaGrad periods, page checksums), the
sizes that choose shards and row groups, checksummed reads, and :class:`ParquetSource`, which
streams a cache's shards back (prefetched, verified, decoded). :mod:`.cache` describes the layout;
:mod:`.cache_writer` writes it.
"""

from __future__ import annotations

import math

import hashlib
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..core.config import DTYPES
from ..core.errors import InputError
from ..core.trajectory import Segment
from .datasets import arrow_array, numpy_column, parquet_table, table_bytes
from .location import Location, StorageError
from .manifest import DIGEST_KEY, ShardRef

MANIFEST = "manifest.json"
ROW_DIGESTS = "rows.parquet"  # per training row: id, digest (datasets.row_digests); in the manifest's files
ROW_FILES = (ROW_DIGESTS, "removed.parquet", "added.parquet")  # a cache's own Parquet files, beside the manifest
DEFAULT_SHARD_BYTES = 64 << 20

TORCH_DTYPES = {**DTYPES, "float16": torch.float16, "bfloat16": torch.bfloat16}  # training dtypes + two narrower
STORAGE_DTYPES = tuple(TORCH_DTYPES)


def _vector_values(t: torch.Tensor) -> pa.Array:
    """(k, p) tensor → flat Arrow values: float64/32, Parquet FLOAT16, or bfloat16 as 2-byte
    fixed-size binary (Parquet has no bfloat16 type; the manifest records it)."""
    if t.dtype == torch.float16:
        return arrow_array(t.numpy().reshape(-1))
    if t.dtype == torch.bfloat16:
        raw = t.contiguous().view(torch.int16).numpy()
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(2), raw.size, [None, pa.py_buffer(raw)])
    return arrow_array(t.numpy().reshape(-1))


def _from_values(values: pa.Array, k: int, p: int, storage: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """(k, p) tensor over the decoded Arrow buffer, without a copy when no conversion is needed.

    Arrow marks its buffers read-only, so torch warns that writing to the tensor would be
    undefined; nothing writes to it: trajectories are read-only by design (replays never modify
    the cache), and the buffer is private memory that the tensor keeps alive."""
    if values.null_count:
        raise StorageError("null values in a trajectory column")
    itemsize = torch.empty(0, dtype=storage).element_size()
    buf = values.buffers()[1]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(buf, dtype=torch.int16 if storage == torch.bfloat16 else storage,
                                count=k * p, offset=values.offset * itemsize)
    if storage == torch.bfloat16:
        flat = flat.view(torch.bfloat16)
    return flat.view(k, p).to(dtype)


def storage_dtype(name: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    if isinstance(name, torch.dtype):
        name = dtype_name(name)
    if name not in TORCH_DTYPES:
        raise InputError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {name!r}")
    return TORCH_DTYPES[name]


def sha256(data) -> str:
    """sha256 of bytes or an Arrow buffer (hashlib releases the GIL on large inputs)."""
    return "sha256:" + hashlib.sha256(memoryview(data)).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def shard_steps_for(p: int, itemsize: int, shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    """Steps per shard so that a shard holds about ``shard_bytes`` (θ and g per step)."""
    return max(1, shard_bytes // (2 * p * itemsize))


OVERLAP_SHARDS = 8            # a default shard holds about 1/8 of the run ...
OVERLAP_MIN_BYTES = 8 << 20   # ... but at least ~8 MB: small caches stay in one or few files


def overlap_shard_steps(steps: int, limit: int, floor: int) -> int:
    """Steps per shard for a run of ``steps``: at most ``limit`` (the byte-sized default) and about
    1/:data:`OVERLAP_SHARDS` of the run, but no fewer than ``floor`` (the steps of
    :data:`OVERLAP_MIN_BYTES`). Then the writer threads encode, hash and write (fsync) the earlier
    shards while the run computes the later ones, and only the last is written after it: one
    400-step shard of a 100,000 × 784 replay (50 MB) took 1.35 s to write after the replay had
    finished, most of it the fsync. Multiples of 10 steps keep the default T0's periods whole."""
    per = max(10 * max(1, math.ceil(math.ceil(steps / OVERLAP_SHARDS) / 10)), floor)
    return max(1, min(limit, per))


def row_group_steps_for(p: int, itemsize: int, period: int = 10, group_bytes: int = 8 << 20) -> int:
    """Steps per Parquet row group: a multiple of ``period`` (default 10, a multiple of the
    default T0 = 5 and j0 = 10) holding about ``group_bytes``."""
    per_period = 2 * p * itemsize * period
    return period * max(1, group_bytes // per_period)


def _vectors(t: torch.Tensor) -> pa.FixedSizeListArray:
    values = _vector_values(t)
    vtype = pa.list_(pa.field("element", values.type, nullable=False), t.shape[1])
    return pa.FixedSizeListArray.from_arrays(values, type=vtype)


def shard_bytes(start: int, params: torch.Tensor, grads: torch.Tensor, lrs: np.ndarray,
                row_group_steps: int, digest: str | None = None) -> pa.Buffer:
    """One shard as Parquet; ``digest`` (the run's :meth:`~.manifest.Training.digest`) goes into its
    key-value metadata, so a manifest edited later no longer matches its shards."""
    k = params.shape[0]
    pv, gv = _vectors(params), _vectors(grads)
    # every field required: Parquet then stores no definition levels (measured: 2x faster to
    # encode and decode than nullable lists)
    schema = pa.schema([pa.field("step", pa.int64(), nullable=False), pa.field("lr", pa.float64(), nullable=False),
                        pa.field("params", pv.type, nullable=False), pa.field("grads", gv.type, nullable=False)])
    if digest is not None:
        schema = schema.with_metadata({DIGEST_KEY: digest.encode()})
    table = pa.Table.from_arrays([arrow_array(np.arange(start, start + k, dtype=np.int64)),
                                  arrow_array(lrs.astype(np.float64)), pv, gv], schema=schema)
    # no compression: zstd makes random floats bigger (docs/platform.md); no min/max statistics
    # (never used, and they halve the encoding speed); page checksums let a partial
    # (row-group) read be verified without the whole file
    return table_bytes(table, compression="none", row_group_size=row_group_steps, write_page_checksum=True,
                       use_dictionary=False, write_statistics=False)


def read_verified(loc: Location, expected: str, size: int | None = None) -> pa.Buffer:
    """Contents of ``loc``, checked against the manifest's sha256 (and size)."""
    raw = loc.read_buffer()
    if size is not None and len(raw) != size:
        raise StorageError(f"{loc.uri}: {len(raw)} bytes, the manifest says {size} (truncated or replaced)")
    got = sha256(raw)
    if got != expected:
        raise StorageError(f"{loc.uri}: checksum mismatch (got {got[:19]}…, manifest says {expected[:19]}…); "
                           "the file is corrupted or was replaced")
    return raw


class ParquetSource:
    """Per-step vectors streamed shard by shard from storage.

    While the caller computes on one shard, the next ``prefetch`` (default 2) are fetched,
    verified and decoded by background threads, so at most ``prefetch + 1`` shards are in memory
    whatever T is. A whole shard is checked against its sha256; a partial one (only some row
    groups) by Parquet page checksums. Every shard must also agree with the manifest it is read
    through: its learning rates with the manifest's schedule (``lrs``), and the training digest in
    its footer, when it has one, with the manifest's (``digest``).
    """

    def __init__(self, root: Location, shards: tuple[ShardRef, ...], p: int, dtype: torch.dtype,
                 storage: torch.dtype | None = None, row_group_steps: int | None = None, prefetch: int = 2, *,
                 lrs: np.ndarray | None = None, digest: str | None = None) -> None:
        self.root, self.shards, self.p, self.dtype = root, shards, p, dtype
        self.storage = storage or dtype
        self.row_group_steps = row_group_steps
        self.prefetch = max(1, prefetch)
        self.lrs, self.digest = lrs, digest

    def check_digest(self, metadata: dict | None, uri: str) -> None:
        """A shard written for other training settings than the manifest states is refused."""
        got = (metadata or {}).get(DIGEST_KEY)
        if self.digest is not None and got is not None and got.decode() != self.digest:
            raise StorageError(f"{uri}: this shard was written for other training settings than the manifest "
                               "states (learning rates, λ, batch plan, model or steps); the manifest was edited or "
                               "the shard belongs to another cache")

    def _decode(self, table: pa.Table, uri: str, start: int, stop: int) -> Segment:
        k = table.num_rows
        steps = numpy_column(table.column("step"))
        if k != stop - start or (k and (steps[0] != start or steps[-1] != stop - 1)):
            raise StorageError(f"{uri}: holds steps {steps[:1]}..{steps[-1:]}, expected [{start}, {stop})")
        self.check_digest(table.schema.metadata, uri)
        lrs = numpy_column(table.column("lr")).astype(np.float64, copy=False)
        if self.lrs is not None and not np.array_equal(lrs, self.lrs[start:stop]):
            bad = int(np.nonzero(lrs != self.lrs[start:stop])[0][0])
            raise StorageError(f"{uri}: learning rate {lrs[bad]:g} at step {start + bad}, the manifest's schedule "
                               f"says {self.lrs[start + bad]:g}; the manifest and the shards disagree")

        def vecs(name: str) -> torch.Tensor:
            arr = table.column(name).combine_chunks()
            if arr.type.list_size != self.p:
                raise StorageError(f"{uri}: column {name} has width {arr.type.list_size}, expected {self.p}")
            v = _from_values(arr.values, k, self.p, self.storage, self.dtype)
            if not bool(torch.isfinite(v).all()):  # caches written before CacheWriter checked its inputs
                bad = start + int(torch.nonzero(~torch.isfinite(v).all(dim=1))[0])
                raise InputError(f"{uri}: step {bad} holds non-finite {name} (NaN or inf: a diverged run, or values "
                                 "beyond the storage dtype's range); train the cache again (a smaller --lr, or "
                                 "--storage-dtype float32)")
            return v

        return Segment(start, vecs("params"), vecs("grads"), torch.from_numpy(lrs))

    def read_shard(self, ref: ShardRef) -> Segment:
        """A whole shard, verified against the manifest's sha256."""
        loc = self.root.join(ref.path)
        raw = read_verified(loc, ref.sha256, ref.bytes)
        try:
            table = parquet_table(raw)
        except (pa.ArrowInvalid, OSError) as e:
            raise StorageError(f"{loc.uri}: not a readable shard ({e})") from None
        return self._decode(table, loc.uri, ref.start, ref.stop)

    def read_steps(self, ref: ShardRef, start: int, stop: int) -> Segment:
        """Steps [start, stop) of a shard, fetching only the row groups that hold them."""
        if start <= ref.start and stop >= ref.stop or not self.row_group_steps:
            seg = self.read_shard(ref)
        else:
            loc = self.root.join(ref.path)
            rg = self.row_group_steps
            first, last = (max(start, ref.start) - ref.start) // rg, (min(stop, ref.stop) - 1 - ref.start) // rg
            try:
                with loc.open_random_access() as f:
                    pf = pq.ParquetFile(f, page_checksum_verification=True)
                    table = pf.read_row_groups(list(range(first, last + 1)))
                    table = table.replace_schema_metadata(pf.schema_arrow.metadata)
            except (pa.ArrowInvalid, OSError) as e:
                raise StorageError(f"{loc.uri}: row groups {first}..{last} failed verification or could not "
                                   f"be read ({e})") from None
            a = ref.start + first * rg
            seg = self._decode(table, loc.uri, a, min(ref.start + (last + 1) * rg, ref.stop))
        a, b = max(start, seg.start) - seg.start, min(stop, seg.stop) - seg.start
        if a or b != seg.stop - seg.start:
            seg = Segment(seg.start + a, seg.params[a:b], seg.grads[a:b], seg.lrs[a:b])
        return seg

    def segments(self, start: int, stop: int) -> Iterator[Segment]:
        refs = [r for r in self.shards if r.stop > start and r.start < stop]
        if not refs:
            return
        from collections import deque
        with ThreadPoolExecutor(max_workers=self.prefetch, thread_name_prefix="shard-prefetch") as pool:
            pending = deque(pool.submit(self.read_steps, r, start, stop) for r in refs[: self.prefetch])
            nxt = len(pending)
            try:
                while pending:
                    seg = pending.popleft().result()
                    if nxt < len(refs):  # keep `prefetch` shards coming while the caller computes
                        pending.append(pool.submit(self.read_steps, refs[nxt], start, stop))
                        nxt += 1
                    yield seg
                    del seg
            finally:
                for f in pending:
                    f.cancel()
