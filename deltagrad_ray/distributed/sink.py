"""Results written as they arrive: a crash loses nothing already computed.

Each finished batch becomes one Parquet part (request index, parameters, counters, status)
under ``<out>.parts/``; a rerun with the same signature (cache, data, requests, settings) loads
the parts already there and replays only what is missing. Parts are written atomically, so a
part is either whole or absent.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..core.errors import InputError
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
            t = pq.read_table(pa.BufferReader(part.read_buffer())).to_pydict()
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
