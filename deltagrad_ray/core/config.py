"""The settings of a DeltaGrad replay, as one typed object that round-trips through dicts.

Every layer that stores or transmits settings (the CLI, pipeline configs, erasure plans, result
signatures, cache manifests) goes through :meth:`DeltaGradConfig.to_dict` and
:meth:`DeltaGradConfig.from_dict`, so that no layer keeps its own subset of the fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .errors import InputError
from .schedule import geometric_explicit_steps, uniform_explicit_steps

SCHEDULES = ("uniform", "geometric", "adaptive")
SIGMA_RULES = ("sy/ss", "yy/sy")
CURVATURES = ("auto", "own", "secant", "shared", "own+path")
CONVEX_KINDS = ("logreg", "linear")
# the training dtypes, by the names configs, manifests and the estimators use (one map for all of them)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def training_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a training dtype name (or a torch dtype, checked): float64 or float32."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise InputError(f"dtype must be float64 or float32, got {name}")
        return name
    if not isinstance(name, str) or name not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass(frozen=True)
class DeltaGradConfig:
    """Settings of a replay.

    Args:
      period: T0, an explicit step every T0 steps after the burn-in; default (None): 10 with the
        multi-secant curvatures (``secant``, ``shared``), 5 (the paper's) with the others.
      burn_in: j0, explicit steps at the start (paper default 10).
      history: m, L-BFGS pairs kept per request (paper default 2).
      schedule: ``"uniform"`` (Alg. 1), ``"geometric"`` (gaps growing from ``first_gap`` by
        ``growth`` up to ``max_gap``; ``period`` is then unused), or ``"adaptive"``: the gap
        between explicit steps halves when the L-BFGS prediction measured at an explicit step
        is off by more than ``adaptive_tol`` and doubles (up to ``period``) when it is off by
        less than a quarter of it.
      sigma: scale rule of B_0 = σI, ``"sy/ss"`` (authors') or ``"yy/sy"`` (textbook).
      curvature_eps: pairs with sᵀy ≤ ε‖s‖‖y‖ are skipped.
      curvature_guard: κ; an approximation with ‖B·v‖ > κ·L̂·‖v‖ is refused, where L̂ is the
        largest secant curvature ‖y‖/‖s‖ measured at explicit steps so far. A BFGS matrix
        built from a nearly orthogonal pair can have eigenvalues far above anything the
        objective showed, and a step with η·‖B‖ > 2 diverges (seen on a ReLU MLP: ‖v‖ went
        from 8e-3 to 1e4 in four approximate steps, with no NaN to warn).
      max_curvature: optional known bound L on the Hessian: ‖B·v‖ > L‖v‖ is refused.
      first_gap, growth, max_gap: the geometric schedule.
      adaptive_tol: the adaptive schedule's tolerance on the prediction error.
      curvature: where approximate steps take their curvature from (:mod:`.lbfgs`):
        ``"own"`` — each request's own m pairs in the compact L-BFGS form (Wu et al. 2020);
        ``"secant"`` — each request's own pairs of its last ``shared_history`` explicit steps as a
        multi-secant (least-squares) model; ``"shared"`` — the pairs every request of the batch
        measured at its last ``shared_history`` explicit steps, as one multi-secant model (requests
        of a batch differ by a few rows, so they see nearly the same Hessian); ``"own+path"`` — own
        pairs plus the last ``path_pairs`` secant pairs of the cached path itself, which cost no
        gradient pass (gradient descent only); ``"auto"`` (default): ``secant`` for gradient-descent
        trajectories of the convex built-in models (logreg, linear), ``own`` otherwise. Measured
        (README, "Curvature"): on six GD problems ``secant`` at T0 = 10 was more accurate than ``own``
        at T0 = 5 on every one (median error ≤ 0.005 on all), so that the default does 1.6× fewer
        explicit steps at a better accuracy; with SGD (pairs of different mini-batches) and on a ReLU
        MLP it was no better than own pairs (1.1× worse at T0 = 5, and hundreds of guard fallbacks on the
        MLP), which ``auto`` keeps there (``python -m benchmarks.curvature``). With SGD, pairs of
        different explicit steps come from different mini-batches: keep ``shared_history=1`` for
        ``shared`` there (K = 2–4 doubled the error of own pairs on the tests' SGD problems).
      shared_history: K, explicit steps whose pairs the ``secant`` and ``shared`` models keep.
      path_pairs: P, secant pairs of the cached path added to a request's own (``own+path``).
      shared_rtol: singular values of the shared pairs below this fraction of the largest are
        dropped (their directions are noise).

    Besides these, an approximate step is always refused when it would expand v: for a convex
    objective and η ≤ 2/L the exact gradient map is non-expansive (co-coercivity,
    ‖v − η(∇F(w+v) − ∇F(w))‖ ≤ ‖v‖), so η‖B·v‖² > 2·vᵀB·v means B over-estimates the curvature
    where the iteration is unstable. Training near the edge of stability (η·L = 1.96 on the
    diabetes data) made unguarded replays diverge.

    Example:
      >>> cfg = DeltaGradConfig(period=20, sigma="yy/sy")
      >>> DeltaGradConfig.from_dict(cfg.to_dict()) == cfg
      True
    """

    period: int | None = None
    burn_in: int = 10
    history: int = 2
    schedule: str = "uniform"
    sigma: str = "sy/ss"
    curvature_eps: float = 1e-6
    curvature_guard: float = 2.0
    max_curvature: float | None = None
    first_gap: int = 2
    growth: float = 1.4
    max_gap: int = 40
    adaptive_tol: float = 0.1
    curvature: str = "auto"
    shared_history: int = 4
    path_pairs: int = 4
    shared_rtol: float = 1e-6

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"schedule": SCHEDULES, "sigma": SIGMA_RULES,
                                                      "curvature": CURVATURES}

    def __post_init__(self) -> None:
        if self.period is not None:
            _int(self, "period", 1)
        for name in ("history", "first_gap", "max_gap", "shared_history", "path_pairs"):
            _int(self, name, 1)
        _int(self, "burn_in", 0)
        for name in ("curvature_eps", "curvature_guard", "growth", "adaptive_tol", "max_curvature", "shared_rtol"):
            _float(self, name)
        _choice(self, "schedule", SCHEDULES)
        _choice(self, "sigma", SIGMA_RULES)
        _choice(self, "curvature", CURVATURES)
        if not (0 <= self.curvature_eps < 1):
            raise InputError(f"curvature_eps must be in [0, 1), got {self.curvature_eps!r}")
        if not self.curvature_guard >= 1:
            raise InputError(f"curvature_guard must be >= 1, got {self.curvature_guard!r}")
        if not self.adaptive_tol > 0:
            raise InputError(f"adaptive_tol must be > 0, got {self.adaptive_tol!r}")
        if self.max_curvature is not None and not self.max_curvature > 0:
            raise InputError(f"max_curvature must be > 0, got {self.max_curvature!r}")
        if not self.growth >= 1:
            raise InputError(f"growth must be >= 1, got {self.growth!r}")
        if not (0 <= self.shared_rtol < 1):
            raise InputError(f"shared_rtol must be in [0, 1), got {self.shared_rtol!r}")
        if self.max_gap < self.first_gap:
            raise InputError(f"max_gap must be >= first_gap ({self.first_gap}), got {self.max_gap!r}")

    # -- dicts ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Every field, as plain JSON values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> DeltaGradConfig:
        """The config a dict describes; missing keys take their defaults, unknown keys are refused."""
        d = dict(d or {})
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise InputError(f"unknown DeltaGrad setting {unknown[0]!r}; expected one of {', '.join(allowed)}")
        return cls(**d)

    def replace(self, **changes) -> DeltaGradConfig:
        return dataclasses.replace(self, **changes)

    # -- what "auto" means for a trajectory -------------------------------------------------------
    def resolve(self, *, full_batch: bool, kind: str | None) -> DeltaGradConfig:
        """The concrete settings for a trajectory (``full_batch``: trained by GD) of a model
        (``kind``: the built-in model's kind, None for another module): ``curvature="auto"`` and
        ``period=None`` replaced by what they stand for."""
        curvature = self.curvature
        if curvature == "auto":
            curvature = "secant" if full_batch and kind in CONVEX_KINDS else "own"
        period = self.period or (10 if curvature in ("secant", "shared") else 5)
        return dataclasses.replace(self, curvature=curvature, period=period)

    # -- the schedule --------------------------------------------------------------------------
    def explicit_steps(self, steps: int) -> Tensor:
        """Bool mask (steps,) of the scheduled explicit steps (for ``adaptive``: the burn-in only;
        later explicit steps are decided during the replay). Of a resolved config (see :meth:`resolve`)."""
        if self.period is None:
            raise ValueError("period=None means 'by curvature': resolve the config for its trajectory first "
                             "(DeltaGradConfig.resolve)")
        if self.schedule == "adaptive":
            return torch.arange(steps) < self.burn_in
        if self.schedule == "uniform":
            return uniform_explicit_steps(steps, self.period, self.burn_in)
        return geometric_explicit_steps(steps, self.burn_in, self.first_gap, self.growth, self.max_gap)


_LABELS = {"period": "period T0", "burn_in": "burn-in j0", "history": "history m",
           "shared_history": "shared_history K", "path_pairs": "path_pairs P"}


def _int(cfg: DeltaGradConfig, name: str, low: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise InputError(f"{_LABELS.get(name, name)} must be an integer >= {low}, got {v!r}")


def _float(cfg: DeltaGradConfig, name: str) -> None:
    v = getattr(cfg, name)
    if v is None and name == "max_curvature":
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InputError(f"{name} must be a finite number, got {v!r}")
    object.__setattr__(cfg, name, float(v))


def _choice(cfg: DeltaGradConfig, name: str, allowed: tuple[str, ...]) -> None:
    v = getattr(cfg, name)
    if v not in allowed:
        raise InputError(f"{name} must be one of {', '.join(allowed)}, got {v!r}")
