"""Batch states as explicit values: select requests, concatenate batches, move devices.

The replay engine's states hold B requests as rows of tensors. :class:`Batched` gives a frozen
dataclass of such tensors three operations that do not need to know its fields: every tensor
field is indexed by request along its first dimension, nested batched values recurse, and
everything else (a step number, a rule name) is shared by the whole batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor


class Batched:
    """Mixin for frozen dataclasses whose tensor fields are (B, …) rows, one per request.

    Fields named in ``_shared`` are batch-level (the same for every request): ``select`` keeps
    them and ``concat`` requires them to be equal, unless they are batched values themselves
    (then their own ``select``/``concat`` decide).
    """

    _shared: tuple[str, ...] = ()

    def _values(self) -> list[tuple[str, object]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]  # type: ignore[arg-type]

    def select(self, idx: Tensor | Sequence[int]):
        """The state of a subset of the requests (requests are independent rows), in ``idx``'s order."""
        out = {}
        for name, v in self._values():
            if isinstance(v, Batched):
                out[name] = v.select(idx)
            elif isinstance(v, Tensor) and name not in self._shared:
                out[name] = v[torch.as_tensor(idx, dtype=torch.int64, device=v.device)]
            else:
                out[name] = v
        return type(self)(**out)

    @classmethod
    def concat(cls, items: Sequence):
        """The batches of ``items`` as one, requests in order."""
        if not items:
            raise ValueError("nothing to concatenate")
        out = {}
        for name, v in items[0]._values():
            vals = [getattr(it, name) for it in items]
            if isinstance(v, Batched):
                out[name] = type(v).concat(vals)
            elif isinstance(v, Tensor) and name not in cls._shared:
                out[name] = torch.cat(vals)
            else:
                if any(not _same(v, x) for x in vals[1:]):
                    raise ValueError(f"cannot concatenate batches that differ in {name}")
                out[name] = v
        return cls(**out)

    def to(self, device: torch.device | str):
        """The same state with every tensor on ``device`` (states cross process boundaries on the CPU)."""
        return type(self)(**{k: v.to(device) if isinstance(v, (Tensor, Batched)) else v
                             for k, v in self._values()})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    @property
    def device(self) -> torch.device:
        for _, v in self._values():
            if isinstance(v, (Tensor, Batched)):
                return v.device
        return torch.device("cpu")


def _same(a, b) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b.to(a.device)))
    return a == b
