"""The other unlearning methods of the survey, under DeltaGrad's interface (issue 7).

Every method is a frozen configuration with ``fit(data) -> state``, ``change(state, delete_ids=,
add=)``, ``apply(state, change) -> Outcome`` and ``exact(state, change) -> Outcome`` (its own exact
reference), plus ``evaluate``; see :mod:`.base`. Pure torch: no Ray, no I/O.

=================  ==============================================  ================================
method             apply                                           exact reference
=================  ==============================================  ================================
ExactRetrain       retraining (same θ_0, learning rates, batches)  itself
DeltaGrad          the core's replay (Wu et al. 2020)              exact retraining
FineTune           k more steps on the changed data                exact retraining
NewtonStep         one Newton step / influence removal             the changed objective's minimiser
Sisa               retrain changed shards from a checkpoint        SISA from scratch, same seeds
Ridge              rank-r Cholesky down/update                     closed-form refit
QKMeans            certify, rerun only if a centroid moves         Q-k-means from scratch, same seed
=================  ==============================================  ================================
"""

from .base import Outcome as Outcome, Rows as Rows, TrainConfig as TrainConfig, Unlearner as Unlearner
from .cholesky import cholesky_update as cholesky_update
from .gradient import (DeltaGrad as DeltaGrad, ExactRetrain as ExactRetrain, FineTune as FineTune,
                       Trained as Trained, exact_retrain as exact_retrain, fit_trained as fit_trained)
from .kmeans import QKMeans as QKMeans, QKMeansState as QKMeansState
from .newton import NewtonState as NewtonState, NewtonStep as NewtonStep, hessian_sum as hessian_sum
from .ridge import Ridge as Ridge, RidgeState as RidgeState, ridge_solution as ridge_solution
from .sisa import Sisa as Sisa, SisaState as SisaState

__all__ = ["Outcome", "Rows", "TrainConfig", "Unlearner", "cholesky_update", "DeltaGrad", "ExactRetrain",
           "FineTune", "Trained", "exact_retrain", "fit_trained", "QKMeans", "QKMeansState", "NewtonState",
           "NewtonStep", "hessian_sum", "Ridge", "RidgeState", "ridge_solution", "Sisa", "SisaState"]
