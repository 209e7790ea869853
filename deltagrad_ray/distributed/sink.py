"""Results written as they arrive: a crash loses nothing already computed.

Each finished batch becomes one Parquet part (request index, parameters, counters, status)
under ``<out>.parts/``; a rerun with the same signature (cache, data, requests, settings) loads
the parts already there and replays only what is missing. Parts are written atomically, so a
part is either whole or absent. :class:`SinkTable` reads the parameters of a finished run back
from its parts a chunk at a time (for statistics over more models than fit in memory).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..core.errors import InputError
from ..stats.tables import check_chunk
from ..store.datasets import parquet_table
from ..store.location import Location, location


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
            have = json.loads(sig.read_text()).get("signature")
            if have != self.signature:
                raise InputError(f"{self.root.uri} holds partial results of a different run; remove it or choose "
                                 "another output location")
        else:
            sig.write_text(json.dumps({"signature": self.signature}))
        self._n = len([p for p in self.root.list() if p.name.startswith("part-")])

    def load(self) -> dict[int, dict]:
        """Finished requests: index → {params, explicit_steps, approx_steps, fallbacks, skipped_pairs, error}."""
        out: dict[int, dict] = {}
        for part in self.root.list():
            if not part.name.startswith("part-"):
                continue
            t = parquet_table(part.read_buffer()).to_pydict()
            for i, r in enumerate(t["request"]):
                out[int(r)] = {k: t[k][i] for k in t if k != "request"}
        return out

    def write(self, requests: list[int], params: torch.Tensor, counters: dict[str, torch.Tensor],
              errors: dict[int, str]) -> None:
        p = params.shape[1]
        flat = params.detach().cpu().double().numpy().reshape(-1)
        cols = {"request": pa.array(requests, pa.int64()),
                "params": pa.FixedSizeListArray.from_arrays(pa.array(flat), p),
                **{k: pa.array(v.cpu().numpy()) for k, v in counters.items()},
                "error": pa.array([errors.get(r) for r in requests], pa.string())}
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(cols), sink)
        self.root.join(f"part-{self._n:06d}.parquet").write_bytes(sink.getvalue())
        self._n += 1

    def clear(self) -> None:
        for part in self.root.list():
            part.delete()


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
        self.parts = sorted((p for p in self.root.list() if p.name.startswith("part-")), key=lambda p: p.name)
        if not self.parts:
            raise InputError(f"{self.root.uri}: no result parts (part-*.parquet) found")
        reqs, errors, p = [], {}, None
        for part in self.parts:
            with part.open_random_access() as fh:
                f = pq.ParquetFile(fh)
                field = f.schema_arrow.field("params").type
                t = f.read(columns=["request", "error"])
            if p is None:
                p = field.list_size
            elif field.list_size != p:
                raise InputError(f"{part.uri}: parameters of length {field.list_size}, other parts {p}")
            r = t.column("request").to_numpy()
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
        with self.parts[k].open_random_access() as fh:
            t = pq.ParquetFile(fh).read(columns=["params"])
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
