"""The request inbox: every file under the requests prefix, every row judged alone.

A request is a row ``{request_id, data_id, timestamp}`` in a file under the inbox:

* **Files** read: JSON lines (``.jsonl``, ``.ndjson``), JSON (``.json``: an array of rows, one row,
  ``{"requests": [rows]}``, or JSON lines), Parquet (``.parquet``), each of the JSON forms also
  gzip-compressed (``.gz``). Text is UTF-8, with or without a byte-order mark, or UTF-16/32 with one.
  Anything else under the inbox (another extension, a hidden or temporary file, a file larger than
  :data:`MAX_FILE_BYTES`, an unreadable file) is reported as not read, with the reason — never
  skipped silently. The legacy ledger folder ``_done/`` of older versions is not part of the inbox.
* **Rows** are judged one at a time, so that no value in one row can stop the others: a row that
  is not a JSON object, or lacks a usable ``request_id`` or ``data_id``, becomes a rejected request
  with the reason. A ``request_id`` is a non-empty string (at most 256 characters, no control
  characters) or an integer. A ``data_id`` is an integer within int64; a float that is an exact
  integer (``12.0``, up to 2^53) and a string of an optional sign and ASCII digits (``"12"``) are
  accepted as that integer. Everything else — ``12.5``, ``NaN``, ``Infinity``, ``1e400``, ``true``,
  ``null``, ``"seven"``, lists — is rejected.
* **Identity** is the pair (request_id, data_id): a request id reused with another data id is
  another request (never a reason to drop an erasure); the same pair in two places is one request.
"""

from __future__ import annotations

import codecs
import gzip
import json
import math
import re
import zlib
from dataclasses import dataclass

from ..store.datasets import parquet_rows
from ..store.location import Location, StorageError, location

LEGACY_LEDGER = "_done"
MAX_FILE_BYTES = 512 << 20
MAX_REQUEST_ID = 256
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
SUFFIXES = (*JSON_SUFFIXES, *(s + ".gz" for s in JSON_SUFFIXES), ".parquet")
_INT64 = (-(2 ** 63), 2 ** 63 - 1)
_DIGITS = re.compile(r"[+-]?[0-9]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Request:
    """One request row, as read.

    Fields:
      request_id: the requester's id (None when the row has none usable)
      data_id:    the training row's id to erase (None when the row has none usable)
      timestamp:  as given (a string), or None
      source:     where it was read: ``file#row`` relative to the inbox (rows count from 0)
      problem:    why the row cannot be a request (None: well-formed)
    """

    request_id: str | None
    data_id: int | None
    timestamp: str | None
    source: str
    problem: str | None = None

    @property
    def key(self) -> tuple[str | None, int | None]:
        """The request's identity: (request_id, data_id)."""
        return self.request_id, self.data_id

    @property
    def valid(self) -> bool:
        return self.problem is None

    @property
    def row(self) -> tuple:
        """What makes an inbox row the same row in a later read: its place and its content (a
        rewritten file's rows are new rows; nothing settled at their place hides them)."""
        return row_identity(self.source, self.request_id, self.data_id, self.problem)


def row_identity(source: str, request_id: str | None, data_id: int | None, problem: str | None) -> tuple:
    """The identity of an inbox row (see :attr:`Request.row`)."""
    return (source, request_id, data_id) if problem is None else (source, "malformed", problem)


@dataclass(frozen=True)
class Inbox:
    """What the inbox held.

    Fields:
      uri:       the inbox (its portable URI)
      requests:  every row of every file read, in file then row order
      not_read:  (file, reason) of each file under the inbox that was not read
    """

    uri: str
    requests: tuple[Request, ...]
    not_read: tuple[tuple[str, str], ...]


def data_id_of(value) -> int:
    """A ``data_id`` value as the integer id it stands for (see the module docstring).

    Raises:
      ValueError: naming what was wrong.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is a boolean")
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise ValueError("beyond int64")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError("not an integer")
        if abs(value) > 2 ** 53:
            raise ValueError("a float beyond 2^53 (give the id as an integer)")
        return int(value)
    if isinstance(value, str):
        s = value.strip()
        if not _DIGITS.fullmatch(s):
            raise ValueError("not an integer")
        v = int(s)
        if not _INT64[0] <= v <= _INT64[1]:
            raise ValueError("beyond int64")
        return v
    raise ValueError(f"a {type(value).__name__}")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _request_id_of(value) -> str:
    if isinstance(value, bool):
        raise ValueError("a boolean")
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"a {type(value).__name__}")
    s = value.strip()
    if not s:
        raise ValueError("empty")
    if len(s) > MAX_REQUEST_ID:
        raise ValueError(f"longer than {MAX_REQUEST_ID} characters")
    if _CONTROL.search(s):
        raise ValueError("holds control characters")
    return s


def judge(row, source: str) -> Request:
    """One row as a :class:`Request` (``problem`` set when it is malformed); never raises."""
    if not isinstance(row, dict):
        return Request(None, None, None, source, f"not a JSON object (a {type(row).__name__})")
    ts = row.get("timestamp")
    ts = ts[:64] if isinstance(ts, str) else None
    rid = row.get("request_id")
    try:
        rid = _request_id_of(rid) if rid is not None else None
    except ValueError as e:
        return Request(None, None, ts, source, f"malformed request_id {_shown(rid)} ({e})")
    if rid is None:
        return Request(None, None, ts, source, "missing request_id")
    if "data_id" not in row or row["data_id"] is None:
        return Request(rid, None, ts, source, "missing data_id")
    try:
        did = data_id_of(row["data_id"])
    except ValueError as e:
        return Request(rid, None, ts, source,
                       f"malformed data_id {_shown(row['data_id'])} ({e}): expected an integer id")
    return Request(rid, did, ts, source)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _loads(text: str):
    return json.loads(text, parse_constant=_refuse_constant)


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _lines(raw: bytes) -> list[tuple[int, str | None]]:
    """(line number, text or None when the line is not valid text) of a text file."""
    for bom, enc in _BOMS:
        if raw.startswith(bom):
            try:
                return list(enumerate(raw.decode(enc).splitlines(), 1))
            except UnicodeDecodeError:
                break
    out: list[tuple[int, str | None]] = []
    for i, line in enumerate(raw.split(b"\n"), 1):
        try:
            out.append((i, line.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError:
            out.append((i, None))
    return out


def _json_rows(raw: bytes, rel: str, whole_document: bool) -> list[Request]:
    lines = _lines(raw)
    if whole_document:  # .json: an array of rows, one row, {"requests": [...]}; else JSON lines
        text = "\n".join(t for _, t in lines if t is not None)
        if all(t is not None for _, t in lines) and text.strip():
            try:
                doc = _loads(text)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and isinstance(doc.get("requests"), list):
                doc = doc["requests"]
            if isinstance(doc, list):
                return [judge(r, f"{rel}#{i}") for i, r in enumerate(doc)]
            if isinstance(doc, dict):
                return [judge(doc, f"{rel}#0")]
    out, i = [], 0
    for lineno, text in lines:
        if text is not None and not text.strip():
            continue
        src = f"{rel}#{i}"
        i += 1
        if text is None:
            out.append(Request(None, None, None, src, f"line {lineno}: not UTF-8 text"))
            continue
        try:
            row = _loads(text)
        except ValueError as e:
            msg = getattr(e, "msg", None) or str(e)
            out.append(Request(None, None, None, src, f"line {lineno}: not JSON ({msg[:80]})"))
            continue
        out.append(judge(row, src))
    return out


def _parquet_rows(buf, rel: str) -> list[Request]:
    # an Arrow buffer, not Python bytes: Arrow's threads must not own Python objects (runtime.py)
    return [judge(r, f"{rel}#{i}") for i, r in enumerate(parquet_rows(buf))]


def _file_rows(f: Location, rel: str) -> list[Request]:
    """The rows of one inbox file; ValueError or StorageError when the file cannot be read."""
    name = f.name.lower()
    if name.endswith(".parquet"):
        return _parquet_rows(f.read_buffer(), rel)
    raw = f.read_bytes()
    if name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"not a readable gzip file ({e})") from None
        name = name[:-3]
    return _json_rows(raw, rel, whole_document=name.endswith(".json"))


def _why_not(rel: str, size: int | None) -> str | None:
    """Why a file under the inbox is not read (None: it is)."""
    base = rel.rsplit("/", 1)[-1]
    if base.startswith(".") or base.endswith((".tmp", ".part")):
        return "a hidden or temporary file (still being written?)"
    if not base.lower().endswith(SUFFIXES):
        return f"not a request file (expected {', '.join(SUFFIXES)})"
    if size is not None and size > MAX_FILE_BYTES:
        return f"larger than {MAX_FILE_BYTES >> 20} MB (split it into smaller files)"
    return None


def read_inbox(prefix: str | Location) -> Inbox:
    """Every request row under ``prefix`` and every file not read, with why (see the module docstring)."""
    root = location(prefix)
    base = root.uri.rstrip("/") + "/"
    requests: list[Request] = []
    not_read: list[tuple[str, str]] = []
    for f, size in root.sizes(recursive=True):
        rel = f.uri[len(base):] if f.uri.startswith(base) else f.name
        if rel.split("/", 1)[0] == LEGACY_LEDGER:
            continue  # the ledger of older versions (settlements, not requests: erasure.ledger reads it)
        try:
            why = _why_not(rel, size)
            if why is not None:
                not_read.append((rel, why))
                continue
            requests.extend(_file_rows(f, rel))
        except (ValueError, StorageError) as e:  # one unreadable file: the others are read
            not_read.append((rel, f"unreadable: {str(e).splitlines()[0][:160]}"))
    return Inbox(root.portable_uri, tuple(requests), tuple(not_read))
