"""The one place that reads (and sets) environment variables.

The package reads its settings from arguments and configs. The environment matters only for what
the platform puts there, and every such read goes through this module (a lint test checks it):

* AWS settings (``AWS_*``): endpoint, region, profile and the config files, read when a location
  is resolved (:mod:`.store.s3`); credentials are never read into this program's own settings;
* ``RAY_ADDRESS``: the cluster a fan-out joins when no address is given;
* ``DELTAGRAD_DEBUG``: tracebacks for unexpected errors on the command line;
* ``DELTAGRAD_NO_PROGRESS``: no progress bars (also off when stderr is not a terminal);
* ``DELTAGRAD_FAULT_AFTER_WRITE``: the fault-injection hook of the storage layer's tests (read once
  per process).

No project imports: every layer may use it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

FAULT_ENV = "DELTAGRAD_FAULT_AFTER_WRITE"


def get(name: str) -> str | None:
    """The variable's value, or None when it is unset (read now: tests and users may change it)."""
    return os.environ.get(name)


def variables() -> Mapping[str, str]:
    """The whole environment (read-only use: the S3 settings resolve from it)."""
    return os.environ


def set_default(name: str, value: str) -> None:
    """Set a variable for this process and its children unless it is set already (a platform
    setting the user's own value overrides, e.g. ``OMP_WAIT_POLICY`` for Ray workers)."""
    os.environ.setdefault(name, value)


def debug() -> bool:
    return bool(get("DELTAGRAD_DEBUG"))


def progress_disabled() -> bool:
    return bool(get("DELTAGRAD_NO_PROGRESS"))


def ray_address() -> str | None:
    return get("RAY_ADDRESS") or None


@functools.cache
def fault_after_write() -> str | None:
    """The raw fault-hook setting, read once per process (it is checked on every write)."""
    return get(FAULT_ENV) or None
