"""Train a model on a data set and publish its trajectory cache (data URI in, cache URI out).

``python -m pipelines.train --config FILE``; the job is :mod:`deltagrad_ray.jobs.train`.
"""

from __future__ import annotations

import sys

from deltagrad_ray.jobs.train import SCHEMA as SCHEMA, defaults as defaults, run as run
from deltagrad_ray.jobs.config import main

if __name__ == "__main__":
    sys.exit(main(__doc__, SCHEMA, run))
