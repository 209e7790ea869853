"""How a deltagrad-ray process ends: with its documented exit code, every time.

The ``deltagrad-ray`` command and the jobs' entry points (``python -m pipelines.X``) end through
:func:`end`: it shuts down what must be shut down (a local Ray started by this process, logging),
flushes stdout and stderr, then ends the process with ``os._exit``. The interpreter's own
teardown is skipped on purpose: with pyarrow's worker threads alive (its CPU pool, started by any
Parquet read), the teardown at exit sometimes aborts the process after the work is done and the
result or error printed ("terminate called without an active exception", exit 134, more often
under CPU load), which turned documented exit codes (0, 2, 3) into 134 for scripts and CronJobs.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_STORAGE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# a fleet job where some models failed and the others finished (their requests pend for the failed ones)
EXIT_PARTIAL = 4


def end(code: int) -> NoReturn:
    """End this process with ``code``, after shutting Ray and logging down and flushing stdout
    and stderr, without the interpreter's teardown (see the module docstring).

    Args:
      code: the exit status (0-255).
    """
    try:
        _shutdown_ray()
        import logging
        logging.shutdown()
    except BaseException:  # noqa: B036 - nothing may stop the process from ending with its code
        pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: B036 - a closed or broken pipe: nothing left to flush
                pass
        os._exit(int(code) & 0xFF)


def _shutdown_ray() -> None:
    """Stop the Ray this process connected to (a local Ray it started: its processes too)."""
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        ray.shutdown()
