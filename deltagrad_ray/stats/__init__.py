"""Statistics from replayed models: jackknife, leave-one-out influence, jackknife+/CV+ conformal prediction.

Pure functions of tensors. :mod:`.jackknife` and :mod:`.conformal` take the models' predictions
as one dense tensor (the reference); :mod:`.streaming` computes the same from the models
themselves (a :class:`ModelTable`) in chunks, in bounded memory — the path the API uses.
"""

from .conformal import (check_alpha as check_alpha, endpoint_shift_bound as endpoint_shift_bound,
                          score_shift_bound as score_shift_bound,
                        jackknife_plus_intervals as jackknife_plus_intervals,
                        jackknife_plus_sets as jackknife_plus_sets)
from .jackknife import Jackknife as Jackknife, jackknife as jackknife, loo_influence as loo_influence
from .streaming import (DEFAULT_MEMORY_MB as DEFAULT_MEMORY_MB, Calibration as Calibration, Chunks as Chunks,
                        check_memory_mb as check_memory_mb, plan_chunks as plan_chunks, predict as predict,
                        streamed_intervals as streamed_intervals,
                        streamed_jackknife as streamed_jackknife, streamed_sets as streamed_sets,
                        streamed_test_loss as streamed_test_loss)
from .tables import ModelTable as ModelTable, TensorTable as TensorTable, as_table as as_table
