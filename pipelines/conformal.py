"""Jackknife+ / CV+ prediction intervals or sets from DeltaGrad refits, fanned out on Ray.

``python -m pipelines.conformal --config FILE``; the job is :mod:`deltagrad_ray.jobs.conformal`.
"""

from __future__ import annotations

import sys

from deltagrad_ray.jobs.conformal import SCHEMA as SCHEMA, defaults as defaults, run as run
from deltagrad_ray.jobs.config import main

if __name__ == "__main__":
    sys.exit(main(__doc__, SCHEMA, run))
