"""Errors raised for bad input. Messages are one line: the problem, then what was expected."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from a user: ids, data, settings. The CLI prints it as one line and exits 2."""
