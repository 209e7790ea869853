"""Errors raised for bad input. Messages are one line: the problem, then what was expected.

The project's errors cross process boundaries (a Ray task or actor raises them, the driver
reports them): :class:`Portable` serializes an error as its class, ``args`` and attributes, so a
subclass rebuilds whatever its ``__init__`` takes, and reaches the driver with its own type and
one-line message.
"""

from __future__ import annotations


def _rebuild(cls: type, args: tuple, state: dict) -> BaseException:
    """An error of ``cls`` with these ``args`` and attributes, without calling its ``__init__``."""
    e = cls.__new__(cls, *args)
    e.args = args
    e.__dict__.update(state)
    return e


class Portable:
    """Mixin for exceptions: serialized as (class, args, attributes), rebuilt without ``__init__``."""

    def __reduce__(self):
        return _rebuild, (type(self), tuple(self.args), dict(self.__dict__))


class InputError(Portable, ValueError):
    """Bad input from a user: ids, data, settings. The CLI prints it as one line and exits 2."""
