"""Results written as they arrive: a crash loses nothing already computed.

Each finished batch becomes one Parquet part (request index, parameters, counters, status)
under ``<out>.parts/``, named by its position: the first request it holds
(``part-000000040.parquet`` holds requests from 40 on). A rerun with the same signature (cache,
data, requests, settings) loads the parts already there and replays only what is missing, in
batches that again name themselves by their first request — a request no part holds — so a
resume fills the gaps and never overwrites or collides with a part already there. Parts are
written atomically and create-only, so a part is either whole or absent; one found damaged
(truncated, not Parquet, the wrong columns or shape, requests outside the run) stops the run
with a :class:`~deltagrad_ray.store.location.StorageError` naming it, to delete (its requests
are then recomputed). Parts of older versions, numbered by a counter (``part-000003.parquet``),
are still read. :class:`SinkTable` reads the parameters of a finished run back from its parts a
chunk at a time (for statistics over more models than fit in memory).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..core.errors import InputError
from ..core.replay import COUNTERS
from ..stats.tables import check_chunk
from .datasets import numpy_column, parquet_table
from .location import Conflict, Location, StorageError, location

_POSITIONAL = re.compile(r"part-(\d{9,})\.parquet")  # named by the first request; older parts: 6-digit counter


def part_name(first_request: int) -> str:
    """The name of the part whose first (smallest) request is ``first_request``."""
    return f"part-{int(first_request):09d}.parquet"


def _damaged(part: Location, why: str) -> StorageError:
    return StorageError(f"{part.uri}: damaged ({why}); delete it and rerun to recompute those requests")


def _is_part(loc: Location) -> bool:
    return loc.name.startswith("part-")


def read_part(part: Location, n: int | None = None, p: int | None = None,
              columns: list[str] | None = None) -> pa.Table:
    """A result part, checked: readable Parquet with the columns a part has, ``p`` parameters a
    row (if given), distinct requests in [0, ``n``) (if given), the first one the one its name
    says. Raises :class:`StorageError` naming the part ("damaged (…)") otherwise."""
    try:
        t = parquet_table(part.read_buffer(), columns)
    except (pa.ArrowException, OSError, ValueError) as e:
        why = " ".join(str(e).split())[:160] or type(e).__name__
        raise _damaged(part, f"not a readable Parquet file: {why}") from None
    names = t.column_names
    for col in (columns or ["request", "params", *COUNTERS, "error"]):
        if col not in names:
            raise _damaged(part, f"no column {col!r}")
    if t.num_rows == 0:
        raise _damaged(part, "it holds no requests")
    req_type = t.schema.field("request").type
    if not pa.types.is_integer(req_type) or t.column("request").null_count:
        raise _damaged(part, f"column 'request' must be integers without nulls, got {req_type}")
    if "params" in names:
        ptype = t.schema.field("params").type
        if not (pa.types.is_fixed_size_list(ptype) and pa.types.is_floating(ptype.value_type)):
            raise _damaged(part, f"column 'params' must be fixed-size lists of floats, got {ptype}")
        if p is not None and ptype.list_size != p:
            raise _damaged(part, f"{ptype.list_size} parameters a row, the model has {p}")
        if t.column("params").null_count:
            raise _damaged(part, "column 'params' has null rows")
    for col in COUNTERS:
        if col in names and not pa.types.is_integer(t.schema.field(col).type):
            raise _damaged(part, f"column {col!r} must be integers, got {t.schema.field(col).type}")
    for col, ok, what in (("error_estimate", pa.types.is_floating, "floats"),
                          ("error_absolute", pa.types.is_floating, "floats"),
                          ("error_reliable", pa.types.is_boolean, "booleans")):
        if col in names and not ok(t.schema.field(col).type):  # optional: parts written before the estimate
            raise _damaged(part, f"column {col!r} must be {what}, got {t.schema.field(col).type}")
    if "error" in names and not (pa.types.is_string(t.schema.field("error").type)
                                 or pa.types.is_null(t.schema.field("error").type)):
        raise _damaged(part, f"column 'error' must be strings, got {t.schema.field('error').type}")
    req = numpy_column(t.column("request"))
    if n is not None and ((req < 0) | (req >= n)).any():
        bad = req[(req < 0) | (req >= n)]
        raise _damaged(part, f"request {int(bad[0])} is outside this run's requests 0..{n - 1}")
    if len(np.unique(req)) != len(req):
        raise _damaged(part, "a request appears twice in it")
    m = _POSITIONAL.fullmatch(part.name)
    if m is not None and int(m.group(1)) != int(req.min()):
        raise _damaged(part, f"its name says its first request is {int(m.group(1))}, it holds {int(req.min())}")
    return t


class ResultSink:
    """Incremental, resumable results for one run.

    Args:
      root: where the parts go (e.g. ``results.parquet.parts``).
      signature: what makes two runs the same; a different run at the same location is refused.
    """

    def __init__(self, root: str | Location, signature: dict) -> None:
        self.root = location(root)
        self.signature = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()
        sig = self.root.join("run.json")
        if sig.exists():
            try:
                have = json.loads(sig.read_text()).get("signature")
            except (ValueError, AttributeError):
                raise StorageError(f"{sig.uri}: damaged (not the JSON this program writes); delete the folder "
                                   f"{self.root.uri} and rerun (its results cannot be told to belong to this run)") \
                    from None
            if have != self.signature:
                raise InputError(f"{self.root.uri} holds partial results of a different run; remove it or choose "
                                 "another output location")
        else:
            sig.write_text(json.dumps({"signature": self.signature}))

    def parts(self) -> list[Location]:
        return [part for part in self.root.list() if _is_part(part)]

    def load(self, n: int | None = None, p: int | None = None) -> dict[int, dict]:
        """Finished requests: index → {params, explicit_steps, approx_steps, fallbacks, skipped_pairs, error}.

        Every part is checked (:func:`read_part`; ``n`` requests, ``p`` parameters if given), and no
        request may be in two parts: a :class:`StorageError` names the part otherwise."""
        out: dict[int, dict] = {}
        where: dict[int, Location] = {}
        for part in self.parts():
            t = read_part(part, n, p).to_pydict()
            for i, r in enumerate(t["request"]):
                r = int(r)
                if r in where:
                    raise StorageError(f"{part.uri}: damaged (request {r} is also in {where[r].name}); delete one "
                                       "of the two and rerun to recompute its requests")
                where[r] = part
                out[r] = {k: t[k][i] for k in t if k != "request"}
        return out

    def write(self, requests: list[int], params: torch.Tensor, counters: dict[str, torch.Tensor],
              errors: dict[int, str], estimates: dict[str, torch.Tensor] | None = None) -> None:
        """One finished batch, as the part named by its first request (create-only); ``estimates``:
        the error estimate's columns (``error_estimate``, ``error_absolute`` float64, ``error_reliable`` bool)."""
        p = params.shape[1]
        flat = params.detach().cpu().double().numpy().reshape(-1)
        cols = {"request": pa.array(requests, pa.int64()),
                "params": pa.FixedSizeListArray.from_arrays(pa.array(flat), p),
                **{k: pa.array(v.cpu().numpy()) for k, v in counters.items()},
                **{k: pa.array(v.cpu().numpy()) for k, v in (estimates or {}).items()},
                "error": pa.array([errors.get(r) for r in requests], pa.string())}
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(cols), sink)
        part = self.root.join(part_name(min(requests)))
        try:
            part.write_bytes(sink.getvalue())
        except Conflict:  # this batch was written already (a lost response, a second run on the same parts)
            have = sorted(int(r) for r in read_part(part, columns=["request"]).column("request").to_pylist())
            if have != sorted(int(r) for r in requests):
                raise StorageError(f"{part.uri}: already holds other requests than this batch's; delete it and "
                                   "rerun to recompute those requests") from None

    def clear(self) -> None:
        for part in self.root.list():
            part.delete()


def discard_parts(root: str | Location) -> None:
    """Delete a run's parts and their folder (once its final output is written, they are not needed)."""
    parts = location(root)
    for f in parts.list():
        f.delete()
    if parts.is_local and parts.is_dir():
        os.rmdir(parts.path)


class SinkTable:
    """The replayed parameters of a run, read back from its result parts a chunk of requests at a time.

    A :class:`~deltagrad_ray.stats.ModelTable` in request order. Opening it reads only the
    ``request`` and ``error`` columns of every part (an index of 8 bytes per request); a chunk
    reads the parts that hold its requests, keeping those the next chunk also needs. Parts of
    consecutive requests (the usual case: batches are runs of requests) are each read once per pass.

    Args:
      root: the parts' location (a :class:`ResultSink`'s root, e.g. ``results.parquet.parts``).
      n: the number of requests of the run; every request 0 … n − 1 must be there exactly once.
        Default: as many as the parts hold.

    Attributes:
      errors: request → reason, for requests that failed (their parameters are NaN).
    """

    def __init__(self, root: str | Location, n: int | None = None) -> None:
        self.root = location(root)
        self.parts = sorted((p for p in self.root.list() if _is_part(p)), key=lambda p: p.name)
        if not self.parts:
            raise InputError(f"{self.root.uri}: no result parts (part-*.parquet) found")
        reqs, errors, p = [], {}, None
        for part in self.parts:
            try:
                with part.open_random_access() as fh:
                    f = pq.ParquetFile(fh)
                    field = f.schema_arrow.field("params").type
                    t = f.read(columns=["request", "error"])
            except (pa.ArrowException, KeyError, ValueError) as e:
                why = " ".join(str(e).split())[:160] or type(e).__name__
                raise _damaged(part, f"not a readable result part: {why}") from None
            if not pa.types.is_fixed_size_list(field) or not pa.types.is_integer(t.schema.field("request").type):
                raise _damaged(part, f"columns of the wrong types (params {field}, request "
                                     f"{t.schema.field('request').type})")
            if p is None:
                p = field.list_size
            elif field.list_size != p:
                raise _damaged(part, f"{field.list_size} parameters a row, other parts {p}")
            r = numpy_column(t.column("request"))
            reqs.append(r)
            errors.update({int(i): e for i, e in zip(r, t.column("error").to_pylist()) if e})
        self._p = int(p)
        where = np.concatenate([np.full(len(r), k, dtype=np.int32) for k, r in enumerate(reqs)])
        offset = np.concatenate([np.arange(len(r), dtype=np.int32) for r in reqs])
        allreq = np.concatenate(reqs)
        n = len(allreq) if n is None else int(n)
        counts = np.bincount(allreq[(allreq >= 0) & (allreq < n)], minlength=n)
        if len(allreq) != n or (counts != 1).any():
            missing, twice = np.nonzero(counts == 0)[0], np.nonzero(counts > 1)[0]
            raise InputError(f"{self.root.uri}: results for requests 0..{n - 1} expected exactly once each; "
                             f"{len(missing)} missing (e.g. {missing[:3].tolist()}), {len(twice)} repeated "
                             f"(e.g. {twice[:3].tolist()}), {int(((allreq < 0) | (allreq >= n)).sum())} outside")
        self._part = np.empty(n, dtype=np.int32)          # request -> part holding it
        self._row = np.empty(n, dtype=np.int32)           # request -> its row in that part
        self._part[allreq], self._row[allreq] = where, offset
        self.errors = dict(sorted(errors.items()))

    def __len__(self) -> int:
        return len(self._part)

    @property
    def p(self) -> int:
        return self._p

    def _read(self, k: int) -> torch.Tensor:
        try:
            with self.parts[k].open_random_access() as fh:
                t = pq.ParquetFile(fh).read(columns=["params"])
        except (pa.ArrowException, ValueError) as e:
            why = " ".join(str(e).split())[:160] or type(e).__name__
            raise _damaged(self.parts[k], f"not a readable result part: {why}") from None
        flat = t.column("params").combine_chunks().flatten().to_numpy(zero_copy_only=False, writable=True)
        return torch.from_numpy(flat.reshape(-1, self._p))

    def _gather(self, req: np.ndarray, cache: dict[int, torch.Tensor]) -> torch.Tensor:
        out = torch.empty(len(req), self._p, dtype=torch.float64)
        parts = self._part[req]
        for k in np.unique(parts).tolist():
            if k not in cache:
                cache[k] = self._read(k)
            sel = np.nonzero(parts == k)[0]
            out[torch.from_numpy(sel)] = cache[k][torch.from_numpy(self._row[req[sel]].astype(np.int64))]
        return out

    def chunks(self, size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, θ[start:start + size])`` for start = 0, size, …, as float64."""
        check_chunk(size)
        cache: dict[int, torch.Tensor] = {}
        n = len(self)
        for start in range(0, n, size):
            yield start, self._gather(np.arange(start, min(n, start + size)), cache)
            keep = set(np.unique(self._part[start + size:start + 2 * size]).tolist())
            cache = {k: v for k, v in cache.items() if k in keep}

    def rows(self, idx) -> torch.Tensor:
        """θ[idx], as float64."""
        idx = np.asarray(torch.as_tensor(idx, dtype=torch.int64).reshape(-1))
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise InputError(f"rows must be in [0, {len(self)}), got values in [{idx.min()}, {idx.max()}]")
        return self._gather(idx, {})
