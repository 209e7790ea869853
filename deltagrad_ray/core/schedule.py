"""Deterministic schedules: learning rates, mini-batch membership and explicit DeltaGrad steps.

Batch order is a function of (seed, epoch) only, computed with a counter-based hash
(splitmix64) rather than a library RNG, so that the order is the same on every platform,
device and library version. Training, exact retraining and DeltaGrad all ask this module
which rows belong to step t, so they can never disagree (docs/pitfalls.md, rule 6).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import InputError

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_ADD_SALT = 0x5EED_ADD5  # separates the hash stream of added rows from the permutation's


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic, no warnings)."""
    z = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & _M64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
    return z ^ (z >> np.uint64(31))


def _key(seed: int, epoch: int, salt: int = 0) -> np.uint64:
    base = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    mixed = splitmix64(base ^ np.array([(epoch * 0x100000001B3 + salt) & 0xFFFFFFFFFFFFFFFF],
                                       dtype=np.uint64))
    return mixed[0]


class FeistelPermutation:
    """A seeded bijection of [0, n) with O(1) random access in both directions.

    A balanced Feistel network (6 rounds of splitmix64) permutes [0, 4^h) ⊇ [0, n); values that
    land outside [0, n) are mapped again until they fall inside ("cycle walking", Black &
    Rogaway 2002), which keeps it a bijection of [0, n). Where an argsort would cost
    O(n log n) per epoch, this answers "where is row i" and "which rows sit at positions
    [lo, hi)" in O(1) per row: a replay that needs only the deleted rows' batches never pays
    for the whole permutation.
    """

    ROUNDS = 6

    def __init__(self, n: int, key: np.uint64) -> None:
        self.n = int(n)
        self.half = max(1, (max(self.n - 1, 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        ks = splitmix64(np.arange(self.ROUNDS, dtype=np.uint64) ^ key)
        self.keys = [np.uint64(k) for k in ks]

    def _rounds(self, x: np.ndarray, inverse: bool, keys: list | None = None) -> np.ndarray:
        h, m = np.uint64(self.half), self.mask
        L, R = x >> h, x & m
        keys = self.keys if keys is None else keys
        if not inverse:
            for k in keys:
                L, R = R, L ^ (splitmix64(R ^ k) & m)
        else:
            for k in reversed(keys):
                L, R = R ^ (splitmix64(L ^ k) & m), L
        return (L << h) | R

    def _walk(self, x: np.ndarray, inverse: bool, keys: list | None = None) -> np.ndarray:
        """The rounds, repeated on the values outside [0, n); ``keys``: per-value round keys
        (arrays shaped like ``x``) instead of this permutation's."""
        x = self._rounds(x.astype(np.uint64), inverse, keys)
        out = x >= np.uint64(self.n)
        while out.any():
            x[out] = self._rounds(x[out], inverse, None if keys is None else [k[out] for k in keys])
            out = x >= np.uint64(self.n)
        return x

    def position(self, rows: np.ndarray) -> np.ndarray:
        """Position of each row in the permuted order."""
        return self._walk(rows, False).astype(np.int64)

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """The rows at the given positions of the permuted order."""
        return self._walk(positions, True).astype(np.int64)


@functools.lru_cache(maxsize=256)
def _permutation(n: int, seed: int, epoch: int) -> FeistelPermutation:
    """The permutation of an epoch, built once (a replay asks for the same epoch's rows and
    positions at several steps)."""
    return FeistelPermutation(n, _key(seed, epoch))


@dataclass(frozen=True)
class BatchPlan:
    """Which rows form the mini-batch of each step.

    Rows ``0 .. n_base-1`` are the rows training saw: in epoch e they are ordered by a seeded
    permutation (:class:`FeistelPermutation`) and cut into ``batches_per_epoch`` consecutive
    batches of ``batch_size`` (the last one smaller). Rows added later are placed by a hash of
    (seed, epoch, id), so a row's batch does not depend on which other rows were added with it.
    With ``batch_size=None`` (gradient descent) every step sees every row.

    Step t belongs to epoch ``t // batches_per_epoch`` and batch ``t % batches_per_epoch``.
    """

    n_base: int
    batch_size: int | None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_base < 1:
            raise InputError(f"the data set must have at least 1 row, got {self.n_base}")
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {self.batch_size}")
        if self.batch_size is not None and self.batch_size >= self.n_base:
            object.__setattr__(self, "batch_size", None)  # one batch per epoch is GD

    @property
    def full_batch(self) -> bool:
        return self.batch_size is None

    @property
    def batches_per_epoch(self) -> int:
        return 1 if self.batch_size is None else math.ceil(self.n_base / self.batch_size)

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of a step."""
        return divmod(step, self.batches_per_epoch)

    def _perm(self, epoch: int) -> FeistelPermutation:
        return _permutation(self.n_base, self.seed, epoch)

    def permutation(self, epoch: int) -> Tensor:
        """The whole order of the base rows in an epoch, (n_base,) int64."""
        return torch.from_numpy(self._perm(epoch).rows_at(np.arange(self.n_base, dtype=np.uint64)))

    def batch_bounds(self, k: int) -> tuple[int, int]:
        """[start, stop) of batch k within an epoch's order."""
        if self.batch_size is None:
            return 0, self.n_base
        return k * self.batch_size, min((k + 1) * self.batch_size, self.n_base)

    def batch_rows(self, epoch: int, k: int) -> Tensor:
        """Base rows of batch k of an epoch, in permuted order (O(batch size))."""
        lo, hi = self.batch_bounds(k)
        return torch.from_numpy(self._perm(epoch).rows_at(np.arange(lo, hi, dtype=np.uint64)))

    def batch_of_base_rows(self, rows: Tensor, epoch: int) -> Tensor:
        """Batch index, in ``epoch``, of each base row in ``rows`` (O(len(rows)))."""
        if self.batch_size is None or len(rows) == 0:
            return torch.zeros(len(rows), dtype=torch.int64)
        pos = self._perm(epoch).position(rows.cpu().numpy().astype(np.uint64))
        return torch.from_numpy(pos // self.batch_size)

    def batches_of_base_rows(self, rows: Tensor, epochs: range) -> Tensor:
        """Batch index of each base row in each of ``epochs``: (len(epochs), len(rows)), the same
        values as :meth:`batch_of_base_rows` per epoch, in one vectorised pass (a replay asks for
        its changed rows' batches of many epochs at once instead of one epoch at a time)."""
        E = len(epochs)
        if self.batch_size is None or len(rows) == 0 or E == 0:
            return torch.zeros(E, len(rows), dtype=torch.int64)
        perms = [self._perm(e) for e in epochs]
        shape = (E, len(rows))
        keys = [np.broadcast_to(np.array([p.keys[i] for p in perms], dtype=np.uint64)[:, None], shape).copy()
                for i in range(FeistelPermutation.ROUNDS)]
        x = np.broadcast_to(rows.cpu().numpy().astype(np.uint64)[None, :], shape).copy()
        pos = perms[0]._walk(x, False, keys).astype(np.int64)
        return torch.from_numpy(pos // self.batch_size)

    def batch_of_added_ids(self, ids: Tensor, epoch: int) -> Tensor:
        """Batch index, in ``epoch``, of each added row, from a hash of its id."""
        if self.batch_size is None or len(ids) == 0:
            return torch.zeros(len(ids), dtype=torch.int64)
        ids_u = ids.cpu().numpy().astype(np.int64).view(np.uint64)
        h = splitmix64(ids_u ^ _key(self.seed, epoch, _ADD_SALT))
        return torch.from_numpy((h % np.uint64(self.batches_per_epoch)).astype(np.int64))

    def to_dict(self) -> dict:
        return {"n_base": self.n_base, "batch_size": self.batch_size, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> BatchPlan:
        return cls(int(d["n_base"]), None if d["batch_size"] is None else int(d["batch_size"]),
                   int(d["seed"]))


# -- learning rates -------------------------------------------------------------------
def learning_rates(steps: int, lr: float, milestones: tuple[int, ...] = (),
                   gamma: float = 0.1) -> Tensor:
    """η_t for t < steps: ``lr`` multiplied by ``gamma`` at each milestone (like MultiStepLR).

    Returns a float64 tensor (steps,). Constant when ``milestones`` is empty.
    """
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    if not (lr > 0 and math.isfinite(lr)):
        raise InputError(f"learning rate must be a finite number > 0, got {lr!r}")
    if not (gamma > 0 and math.isfinite(gamma)):
        raise InputError(f"lr gamma must be a finite number > 0, got {gamma!r}")
    ms = tuple(int(m) for m in milestones)
    if list(ms) != sorted(set(ms)) or any(m < 1 for m in ms):
        raise InputError(f"lr milestones must be increasing steps >= 1, got {list(ms)}")
    t = torch.arange(steps)
    drops = sum((t >= m).to(torch.int64) for m in ms) if ms else torch.zeros(steps, dtype=torch.int64)
    return lr * gamma ** drops.to(torch.float64)


# -- which DeltaGrad steps are explicit -------------------------------------------------------
def uniform_explicit_steps(steps: int, period: int, burn_in: int) -> Tensor:
    """Wu et al. 2020, Alg. 1: the first j0 steps, then every T0-th step. Bool mask (steps,)."""
    if period < 1:
        raise InputError(f"period T0 must be >= 1, got {period!r}")
    if burn_in < 0:
        raise InputError(f"burn-in j0 must be >= 0, got {burn_in!r}")
    t = torch.arange(steps)
    return (t < burn_in) | ((t - burn_in) % period == 0)


def geometric_explicit_steps(steps: int, burn_in: int, first_gap: int = 2, growth: float = 1.4,
                             max_gap: int = 40) -> Tensor:
    """Explicit steps whose spacing grows geometrically after the burn-in.

    After the first ``burn_in`` steps the gaps are ``first_gap``, then × ``growth`` (rounded),
    capped at ``max_gap``. The replayed path converges to the cached one's neighbourhood, so
    corrections matter most early; measured on MNIST-shaped data this reaches a better
    accuracy/speed trade-off than a uniform period (see README, benchmarks.core).
    """
    if burn_in < 0 or first_gap < 1 or growth < 1 or max_gap < first_gap:
        raise InputError("geometric schedule needs burn_in >= 0, first_gap >= 1, growth >= 1, "
                         f"max_gap >= first_gap; got {burn_in}, {first_gap}, {growth}, {max_gap}")
    mask = torch.zeros(steps, dtype=torch.bool)
    mask[: min(burn_in, steps)] = True
    t, gap = burn_in, float(first_gap)
    while t < steps:
        mask[t] = True
        t += int(round(gap))
        gap = min(gap * growth, float(max_gap))
    return mask


def speedup_bound(explicit: Tensor) -> float:
    """T / (number of explicit steps): the speed-up if approximate steps were free."""
    return len(explicit) / max(int(explicit.sum()), 1)
