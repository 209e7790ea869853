"""Progress bars on long work (tqdm on a terminal; silent when stderr is not one, or in tests)."""

from __future__ import annotations

import sys

from . import environment


class _Bar:
    def __init__(self, desc: str) -> None:
        self._bar = None
        self.desc = desc
        self.enabled = sys.stderr.isatty() and not environment.progress_disabled()

    def set_total(self, total: int) -> None:
        if self.enabled and self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=self.desc, unit="req", dynamic_ncols=True)

    def __call__(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def bar(desc: str) -> _Bar:
    """A callable ``progress(n_done)`` with ``set_total`` and ``close``."""
    return _Bar(desc)
