"""Ray job entry points: ``python -m pipelines.<name> --config FILE`` (or ``ray job submit … --``).

Each reads its config, calls the library, writes results and a report. No algorithm code here.
"""
