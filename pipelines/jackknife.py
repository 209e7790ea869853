"""Leave-one-out models by DeltaGrad, fanned out on Ray: jackknife estimates and influence.

``python -m pipelines.jackknife --config FILE``; the job is :mod:`deltagrad_ray.jobs.jackknife`.
"""

from __future__ import annotations

import sys

from deltagrad_ray.jobs.jackknife import SCHEMA as SCHEMA, defaults as defaults, run as run
from deltagrad_ray.jobs.config import main

if __name__ == "__main__":
    sys.exit(main(__doc__, SCHEMA, run))
