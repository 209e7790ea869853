"""Small JSON control files (version records, plans, ledger entries, leases, audit records): written
create-only, read back checked.

Everything read back from storage is checked before it is used: a file that is truncated, not JSON,
or of the wrong shape is a :class:`Damaged` storage error (exit 3) that names the file and says
what to do — never a ``KeyError`` or a traceback. :class:`Fields` reads typed values out of a
decoded object with those messages.
"""

from __future__ import annotations

import json
import math
import posixpath
import re

from .location import Conflict, Location, StorageError


class Damaged(StorageError):
    """A control file read back from storage is truncated, garbage or of the wrong shape."""


def dump(obj) -> bytes:
    """The bytes of a control file (sorted keys: the same object gives the same bytes)."""
    return json.dumps(obj, indent=1, sort_keys=True, default=str, allow_nan=False).encode("utf-8")


def create(loc: Location, obj) -> bool:
    """Create-only write of a JSON object; False if it was there already (a step done before)."""
    try:
        loc.create(dump(obj))
        return True
    except Conflict:
        return False


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def decode(raw: bytes, uri: str, what: str, advice: str) -> dict:
    """The JSON object of a control file; :class:`Damaged` (naming ``uri``, ``what`` it is and
    ``advice``) if it is not valid UTF-8 JSON holding an object (NaN and Infinity refused)."""
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as e:
        first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise Damaged(f"{uri}: damaged {what} (not JSON: {first}); {advice}") from None
    if not isinstance(obj, dict):
        raise Damaged(f"{uri}: damaged {what} (a JSON {type(obj).__name__}, expected an object); {advice}")
    return obj


def read(loc: Location, what: str, advice: str) -> dict | None:
    """The decoded control file at ``loc``, or None if there is none."""
    cur = loc.read_versioned()
    return None if cur is None else decode(cur[0], loc.uri, what, advice)


_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\?#]|://")


def safe_key(key: str) -> bool:
    """A key a record may name below its prefix: relative and normalised (no ``..``, ``.`` or empty
    part, no leading ``/``), no scheme, query, fragment, backslash or control character."""
    return (isinstance(key, str) and 0 < len(key) <= 1024 and not _UNSAFE.search(key)
            and posixpath.normpath(key) == key.rstrip("/")
            and all(p not in ("", ".", "..") for p in key.rstrip("/").split("/")))


class Fields:
    """Typed reads from a decoded control file, each a :class:`Damaged` error naming the field.

    Args:
      obj: the decoded object.
      uri, what, advice: for messages (the file, what it is, what to do about damage).
    """

    def __init__(self, obj: dict, uri: str, what: str, advice: str, prefix: str = "") -> None:
        if not isinstance(obj, dict):
            raise Damaged(f"{uri}: damaged {what} ({prefix.rstrip('.') or 'the file'} is not an object); {advice}")
        self.obj, self.uri, self.what, self.advice, self.prefix = obj, uri, what, advice, prefix

    def _bad(self, key: str, expected: str, value=None, missing: bool = False) -> Damaged:
        got = "missing" if missing else f"got {str(value)[:60]!r}"
        return Damaged(f"{self.uri}: damaged {self.what} (field {self.prefix}{key} must be {expected}, {got}); "
                       f"{self.advice}")

    def _get(self, key: str, optional: bool):
        """The value (an optional field may be missing or null: None)."""
        if key not in self.obj:
            if optional:
                return None
            raise self._bad(key, "present", missing=True)
        return self.obj[key]

    def int(self, key: str, minimum: int | None = None, optional: bool = False) -> int | None:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
            raise self._bad(key, "an integer" + (f" >= {minimum}" if minimum is not None else ""), v)
        return v

    def number(self, key: str, optional: bool = False) -> float | None:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._bad(key, "a finite number", v)
        return float(v)

    def str(self, key: str, optional: bool = False, pattern: re.Pattern | None = None) -> str | None:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if not isinstance(v, str) or (pattern is not None and not pattern.fullmatch(v)):
            raise self._bad(key, "a string" + (" of the expected form" if pattern is not None else ""), v)
        return v

    def key(self, key: str, optional: bool = False) -> str | None:
        """A location relative to the record's prefix (see :func:`safe_key`)."""
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if not safe_key(v):
            raise self._bad(key, "a relative key inside the prefix (no '..', no scheme, no leading '/')", v)
        return v

    def bool(self, key: str, optional: bool = False) -> bool | None:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if not isinstance(v, bool):
            raise self._bad(key, "true or false", v)
        return v

    def list(self, key: str, optional: bool = False) -> list | None:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if not isinstance(v, list):
            raise self._bad(key, "a list", v)
        return v

    def dict(self, key: str, optional: bool = False) -> dict | None:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if not isinstance(v, dict):
            raise self._bad(key, "an object", v)
        return v

    def sub(self, key: str, optional: bool = False) -> Fields | None:
        """The fields of a nested object."""
        v = self.dict(key, optional)
        return None if v is None else Fields(v, self.uri, self.what, self.advice, f"{self.prefix}{key}.")

    def ints(self, key: str, optional: bool = False) -> list[int] | None:
        v = self.list(key, optional)
        if v is None:
            return None
        if not all(isinstance(x, int) and not isinstance(x, bool) and -(2 ** 63) <= x < 2 ** 63 for x in v):
            raise self._bad(key, "a list of int64 ids", v[:3])
        return v


def damaged(loc: Location, what: str, advice: str, detail: str) -> Damaged:
    """A :class:`Damaged` error for a file whose content contradicts another record."""
    return Damaged(f"{loc.uri}: {what} {detail}; {advice}")
