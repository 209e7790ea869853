"""Statistics from replayed models: jackknife, leave-one-out influence, jackknife+/CV+ conformal prediction.

Pure functions of tensors (the models' predictions); the API layer feeds them DeltaGrad's
leave-one-out or K-fold models.
"""

from .conformal import (check_alpha as check_alpha, jackknife_plus_intervals as jackknife_plus_intervals,
                        jackknife_plus_sets as jackknife_plus_sets)
from .jackknife import Jackknife as Jackknife, jackknife as jackknife, loo_influence as loo_influence
