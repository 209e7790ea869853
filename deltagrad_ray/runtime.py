"""The runtime of a deltagrad-ray process: exit codes, signals, how a failure becomes a code, and
how the process ends. The ``deltagrad-ray`` command (:mod:`.cli`) and the jobs' entry points
(:mod:`.jobs.config`) both run through it; the environment is read in :mod:`.environment` only.

Exit codes: 0 done, 1 a bug (unexpected error), 2 bad input or config, 3 storage (unreadable,
damaged, unreachable), 4 a partial fleet (some models failed), 130 interrupted (Ctrl-C or SIGTERM).

The command and the jobs end through :func:`end`: it shuts down what must be shut down (a local
Ray started by this process, logging), flushes stdout and stderr, then ends the process with
``os._exit``. The interpreter's own teardown is skipped on purpose: with pyarrow's worker
threads alive (its CPU pool, started by any Parquet read), the teardown at exit sometimes aborts
the process after the work is done and the result or error printed ("terminate called without an
active exception", exit 134, more often under CPU load), which turned documented exit codes
(0, 2, 3) into 134 for scripts and CronJobs.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
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


def interrupt_on_sigterm() -> None:
    """SIGTERM (kill, a timeout, Kubernetes) interrupts the process as Ctrl-C does."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def run_to_end(main: Callable[[], int]) -> NoReturn:
    """Run ``main`` (which returns an exit code) as a process's whole work, then :func:`end` with its
    code: SIGTERM interrupts it like Ctrl-C (130), argparse's exits keep their codes (a usage error
    is 2), and anything raised outside ``main``'s own handling is a bug (1, with its traceback)."""
    code = EXIT_BUG
    try:
        interrupt_on_sigterm()
        code = main()
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_INPUT)
    except KeyboardInterrupt:  # outside the command (while parsing or importing)
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BaseException:  # noqa: B036 - a bug outside the command: show it, still end with a code
        traceback.print_exc()
        code = EXIT_BUG
    finally:
        end(code)


def one_line(e: BaseException) -> str:
    """An error's message as the one line a process prints."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def report_failure(raised: BaseException, *, show_traceback: bool, hint: str = "") -> int:
    """Print a failure as the command and the jobs do, and return its exit code: bad input (2) and
    storage (3) as one ``error: …`` line; a bug (1) as ``error: unexpected …`` + ``hint``, after its
    traceback (and the remote one, raised in a Ray task or actor) when ``show_traceback``. The
    error line is always the last line of stderr."""
    from .distributed.errors import remote_traceback
    code, e = failure_code(raised)
    if code != EXIT_BUG:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return code
    if show_traceback:
        traceback.print_exc()
        remote = remote_traceback(raised)
        if remote:
            print(remote, file=sys.stderr)
    print(f"error: unexpected {type(e).__name__}: {one_line(e)}{hint}", file=sys.stderr)
    return EXIT_BUG


def failure_code(raised: BaseException) -> tuple[int, BaseException]:
    """The exit code of a failure and the error to report: raised in a Ray task or actor, the
    error as it would have been raised in process. Bad input is 2, storage 3, anything else a bug (1)."""
    from .core.errors import InputError
    from .distributed.errors import local_error
    from .store.location import StorageError
    e = local_error(raised)
    if isinstance(e, InputError):
        return EXIT_INPUT, e
    if isinstance(e, StorageError):
        return EXIT_STORAGE, e
    return EXIT_BUG, e
