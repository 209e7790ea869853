"""The pure core: models, recorded training, exact retraining and DeltaGrad replay.

Only torch and numpy; no Ray, no I/O. Everything here can be called from a notebook with
tensors.
"""

from .batches import BatchIndex as BatchIndex, StepBatch as StepBatch
from .config import DTYPES as DTYPES, DeltaGradConfig as DeltaGradConfig, training_dtype as training_dtype
from .data import (ChangeSet as ChangeSet, Dataset as Dataset, concat as concat,
                   make_change_set as make_change_set, rows_of_ids as rows_of_ids,
                   validate as validate)
from .errors import InputError as InputError
from .lbfgs import Histories as Histories
from .models import FunctionalModel as FunctionalModel, ModelSpec as ModelSpec
from .replay import (BatchedResult as BatchedResult, LocalRows as LocalRows, Replay as Replay,
                     ReplayResult as ReplayResult, ReplayState as ReplayState, RequestError as RequestError,
                     deltagrad as deltagrad, deltagrad_batched as deltagrad_batched,
                     deltagrad_online as deltagrad_online, relative_error as relative_error,
                     retrain_batched as retrain_batched)
from .schedule import (BatchPlan as BatchPlan, geometric_explicit_steps as geometric_explicit_steps,
                       learning_rates as learning_rates, speedup_bound as speedup_bound,
                       uniform_explicit_steps as uniform_explicit_steps)
from .spectral import gram_norm as gram_norm, hessian_norm as hessian_norm
from .synthetic import (synthetic_classification as synthetic_classification,
                        synthetic_regression as synthetic_regression)
from .train import (changed_trajectory as changed_trajectory, retrain as retrain, run_sgd as run_sgd,
                    train as train)
from .trajectory import (InMemory as InMemory, MemoryRecorder as MemoryRecorder,
                         Segment as Segment, Trajectory as Trajectory)
from .requests import (fold_assignment as fold_assignment, from_id_lists as from_id_lists, k_fold as k_fold,
                       leave_one_out as leave_one_out, random_subsets as random_subsets)
