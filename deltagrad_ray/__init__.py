"""deltagrad-ray: rapid retraining after deletions and additions (DeltaGrad), at cluster scale.

The public API. The pure core (``deltagrad_ray.core``) works on tensors; the storage layer
(``deltagrad_ray.store``) reads and writes data sets, trajectory caches and models.
"""

from .core import (BatchPlan as BatchPlan, ChangeSet as ChangeSet, Dataset as Dataset,
                   DeltaGradConfig as DeltaGradConfig, FunctionalModel as FunctionalModel,
                   InputError as InputError, ModelSpec as ModelSpec, ReplayResult as ReplayResult,
                   Trajectory as Trajectory, deltagrad as deltagrad,
                   deltagrad_online as deltagrad_online, learning_rates as learning_rates,
                   make_change_set as make_change_set, relative_error as relative_error,
                   retrain as retrain, synthetic_classification as synthetic_classification,
                   synthetic_regression as synthetic_regression, train as train)

__version__ = "0.1.0"
