"""Ray job entry points: ``python -m pipelines.<name> --config FILE`` (or ``ray job submit … --``).

Each is a thin entry point over :mod:`deltagrad_ray.jobs`: the config schema, its checks and what
the job does live in the library. Run them from the repository root (``pipelines`` is not an
installed package).
"""
