"""The jobs behind the pipelines: config schemas and checks, and what each job does.

Each module holds a job's ``SCHEMA``, its local defaults (``defaults(root)``, the configs the
demo builds in code) and ``run(cfg)``: library calls, results and a report. ``pipelines/<name>.py``
are thin entry points over them (``python -m pipelines.<name> --config FILE``, also as a Ray job).
"""

from __future__ import annotations

JOBS = ("train", "bulk_erasure", "jackknife", "conformal")


def config_schema(job: str) -> dict:
    """The JSON Schema of a job's config file (:func:`.config.json_schema`)."""
    import importlib

    from ..core.errors import InputError
    from .config import json_schema
    if job not in JOBS:
        raise InputError(f"unknown job {job!r}; expected one of {', '.join(JOBS)}")
    module = importlib.import_module(f"{__name__}.{job}")
    return json_schema(module.SCHEMA, f"deltagrad-ray job config: pipelines.{job}", getattr(module, "ARRAYS", None))
