"""Apply pending deletion requests with DeltaGrad and publish a new model version.

``python -m pipelines.bulk_erasure --config FILE``; the job is :mod:`deltagrad_ray.jobs.bulk_erasure`.
"""

from __future__ import annotations

import sys

from deltagrad_ray.jobs.bulk_erasure import OPTIONS, SCHEMA as SCHEMA, defaults as defaults, run as run
from deltagrad_ray.jobs.config import main

if __name__ == "__main__":
    sys.exit(main(__doc__, SCHEMA, run, options=OPTIONS))
