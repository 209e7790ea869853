"""The jobs behind the pipelines: config schemas and checks, and what each job does.

Each module holds a job's ``SCHEMA``, its local defaults (``defaults(root)``, the configs the
demo builds in code) and ``run(cfg)``: library calls, results and a report. ``pipelines/<name>.py``
are thin entry points over them (``python -m pipelines.<name> --config FILE``, also as a Ray job).
"""
