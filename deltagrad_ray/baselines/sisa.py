"""SISA training: sharded, isolated, sliced, aggregated (Bourtoule et al. 2019, "Machine Unlearning").

The rows are split into S shards by a seeded hash of their id, and each shard into R slices the
same way. Shard s trains its own model in R stages: stage j starts from the checkpoint θ_{s,j}
and trains on slices 0..j of the shard (Bourtoule et al., §IV-B: each slice is added to the data
seen so far), giving θ_{s,j+1}; all R + 1 checkpoints are kept. Predictions aggregate the S
models by averaging (class probabilities, or outputs for regression) or by majority vote.

A deletion (or addition) touches the shards of its rows only; each such shard restarts from
the checkpoint before the earliest slice that changed and retrains the remaining stages. The
result is exactly the ensemble SISA would train from scratch on the changed data with the same
seeds: a row's shard and slice depend on its id alone, and every stage is a deterministic
function of its rows, starting point and seed (tested bit for bit).

Each stage is the core's training loop (:func:`~deltagrad_ray.core.run_sgd`) with the shared
:class:`~.base.TrainConfig`, so shard models are the same kind of model as the single model.
A stage whose rows are all gone leaves its checkpoint unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..core.data import ChangeSet, Dataset
from ..core.errors import InputError
from ..core.models import FunctionalModel
from ..core.schedule import BatchPlan
from ..core.train import run_sgd
from .base import Outcome, Rows, TrainConfig, id_bucket, request

AGGREGATES = ("average", "vote")
_SHARD_SALT, _SLICE_SALT = 0x5157A, 0x511CE


class SisaState(NamedTuple):
    """Shards, slices and checkpoints of a SISA ensemble.

    Fields:
      model:       the functional model of every shard
      rows:        current rows (deleted ones flagged)
      shard:       (N,) int64 shard of each row
      slice:       (N,) int64 slice of each row within its shard
      checkpoints: (S, R + 1, p) θ of each shard after 0..R stages (index 0: the initial point)
    """

    model: FunctionalModel
    rows: Rows
    shard: Tensor
    slice: Tensor
    checkpoints: Tensor

    @property
    def params(self) -> Tensor:
        """(S, p) the shard models."""
        return self.checkpoints[:, -1]


@dataclass(frozen=True)
class Sisa:
    """SISA ensembles with exact unlearning by partial retraining.

    Args:
      train: settings of every shard model; ``train.steps`` are split evenly over the R stages.
      shards: S >= 1.
      slices: R >= 1 (at most ``train.steps``, each stage trains at least one step).
      aggregate: ``"average"`` or ``"vote"`` (classification only).
    """

    train: TrainConfig
    shards: int = 5
    slices: int = 1
    aggregate: str = "average"

    def __post_init__(self) -> None:
        if not isinstance(self.shards, int) or self.shards < 1:
            raise InputError(f"SISA needs S >= 1 shards, got S={self.shards!r}")
        if not isinstance(self.slices, int) or self.slices < 1:
            raise InputError(f"SISA needs R >= 1 slices per shard, got R={self.slices!r}")
        if self.slices > self.train.steps:
            raise InputError(f"SISA slices R={self.slices} exceed the {self.train.steps} training steps; "
                             "each slice needs at least one step")
        if self.aggregate not in AGGREGATES:
            raise InputError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")
        if self.aggregate == "vote" and self.train.spec.kind == "linear":
            raise InputError("aggregate='vote' needs a classifier; average the outputs of a linear model")

    @property
    def name(self) -> str:
        return f"sisa(S={self.shards},R={self.slices})"

    def stage_steps(self) -> list[int]:
        """Steps of each of the R stages (they sum to ``train.steps``)."""
        base, extra = divmod(self.train.steps, self.slices)
        return [base + (1 if j < extra else 0) for j in range(self.slices)]

    # -- the interface ---------------------------------------------------------------------------
    def fit(self, data: Dataset) -> SisaState:
        self.train.check(data)
        if len(data) < self.shards:
            raise InputError(f"SISA needs at least one row per shard: {len(data)} rows for S={self.shards}")
        model = self.train.model()
        rows = Rows.of(data)
        shard, slc = self._assign(data.ids)
        init = torch.stack([model.init_params(self.train.seed + s, dtype=data.X.dtype, device=data.X.device)
                            for s in range(self.shards)])
        ckpt = init[:, None, :].repeat(1, self.slices + 1, 1)
        state = SisaState(model, rows, shard, slc, ckpt)
        return self._retrain(state, {s: 0 for s in range(self.shards)})

    def change(self, state: SisaState, *, delete_ids: Tensor | None = None,
               add: Dataset | None = None) -> ChangeSet:
        return request(state.rows, delete_ids=delete_ids, add=add, n_classes=state.model.n_classes)

    def apply(self, state: SisaState, change: ChangeSet) -> Outcome:
        """Retrain only the changed shards, from the checkpoint before their earliest changed slice."""
        rows = state.rows.after(change)
        shard, slc = state.shard, state.slice
        touched = change.delete
        if change.add is not None and len(change.add):
            s_add, r_add = self._assign(change.add.ids)
            shard, slc = torch.cat([shard, s_add.to(shard.device)]), torch.cat([slc, r_add.to(slc.device)])
            touched = torch.cat([touched, torch.arange(len(state.rows.data), len(rows.data), device=touched.device)])
        start: dict[int, int] = {}
        for s, j in zip(shard[touched].tolist(), slc[touched].tolist()):
            start[s] = min(start.get(s, j), j)
        new = self._retrain(SisaState(state.model, rows, shard, slc, state.checkpoints), start)
        steps = self.stage_steps()
        run = sum(sum(steps[j:]) for j in start.values())
        return Outcome(new, new.params, {"retrained_shards": sorted(start), "from_slice": dict(sorted(start.items())),
                                         "steps": run, "steps_from_scratch": self.shards * self.train.steps})

    def exact(self, state: SisaState, change: ChangeSet) -> Outcome:
        """SISA trained from scratch on the rows after ``change``, with the same seeds."""
        rows = state.rows.after(change)
        fresh = self.fit(rows.active())
        return Outcome(fresh, fresh.params, {})

    def evaluate(self, state: SisaState, X: Tensor, y: Tensor) -> dict[str, float]:
        pred = self.predict(state, X)
        if state.model.task == "classification":
            return {"accuracy": float((pred == y).double().mean())}
        return {"mse": float(((pred - y) ** 2).mean())}

    def predict(self, state: SisaState, X: Tensor) -> Tensor:
        """Aggregated prediction: class indices, or real values for regression."""
        model = state.model
        with torch.no_grad():
            outs = torch.stack([model.forward(theta, X) for theta in state.params])     # (S, n, c)
        if model.task == "regression":
            return outs.mean(0).reshape(-1)
        if self.aggregate == "average":
            return torch.softmax(outs, dim=2).mean(0).argmax(1)
        votes = torch.nn.functional.one_hot(outs.argmax(2), model.n_classes).sum(0)   # (n, c)
        return votes.argmax(1)  # ties: the smallest class index

    # -- internals -----------------------------------------------------------------------------
    def _assign(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        seed = self.train.seed
        shard = id_bucket(ids, seed, _SHARD_SALT, self.shards).to(ids.device)
        slc = id_bucket(ids, seed, _SLICE_SALT, self.slices).to(ids.device)
        return shard, slc

    def _retrain(self, state: SisaState, start: dict[int, int]) -> SisaState:
        """Stages start[s]..R−1 of each listed shard s, from checkpoint start[s]."""
        if not start:
            return state
        ckpt = state.checkpoints.clone()
        data, active = state.rows.data, ~state.rows.removed
        steps = self.stage_steps()
        cfg = self.train
        for s, j0 in sorted(start.items()):
            in_shard = active & (state.shard == s)
            for j in range(j0, self.slices):
                idx = torch.nonzero(in_shard & (state.slice <= j)).reshape(-1)
                theta = ckpt[s, j]
                if len(idx):
                    plan = BatchPlan(len(idx), cfg.batch_size, cfg.seed + 7919 * s + j)
                    theta = run_sgd(state.model, data.rows(idx), plan, cfg.lrs(steps[j]), cfg.l2, theta)
                ckpt[s, j + 1] = theta
        return state._replace(checkpoints=ckpt)
