"""Locations: one URI scheme for every place the project reads or writes.

A :class:`Location` is a filesystem (``pyarrow.fs``) plus a path on it. ``file:///x``, a plain
path and ``s3://bucket/prefix[?endpoint_override=…&scheme=…&region=…&profile=…]`` all become a
Location, and everything above this module only calls Location methods — this is the one place
that touches filesystems. A location prints as the short URI (``uri``, for messages); its
:attr:`~Location.portable_uri` also carries the S3 settings it was made with, for whatever crosses
a process boundary (Ray actors, manifests, plans).

Writes are atomic per object: local files go to a temporary name and are linked or renamed; S3
objects appear only when their upload completes. Nothing here overwrites unless asked.
Create-only writes are atomic too: ``os.link`` locally, ``If-None-Match: *`` on S3 (objects up
to :data:`ATOMIC_MAX` bytes; larger ones — trajectory shards, whose names carry a fresh run id —
after an existence check). :meth:`Location.read_versioned` and :meth:`Location.replace` give
compare-and-swap on small control objects (``If-Match`` on S3, a directory lock locally).

Fault injection: with ``DELTAGRAD_FAULT_AFTER_WRITE=k`` in the environment the process kills
itself (SIGKILL) right after its k-th completed storage write, counted over every write, create,
replace and delete of the process — to test that every job resumes from any point.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from .. import environment
from ..core.errors import InputError, Portable
from . import s3 as _s3

# S3 create-only writes up to this size are one conditional PUT (boto3); larger objects go through
# pyarrow's (multipart) upload after an existence check
ATOMIC_MAX = 4 * 2**20
# an S3 object larger than two parts is read in ranged GETs of PART_BYTES, PART_READERS at a time
# (one GET streams at a single connection's rate: what s3transfer and the AWS CLI do, with 8 MB parts)
PART_BYTES = 16 * 2**20
PART_READERS = 8
FAULT_ENV = environment.FAULT_ENV


class StorageError(Portable, RuntimeError):
    """A storage operation failed (missing object, unreachable endpoint, bad checksum, …). Pickles
    (into and out of Ray tasks) with its type and attributes (:class:`~deltagrad_ray.core.errors.Portable`)."""


class Conflict(StorageError):
    """A conditional write lost: the object already exists, or changed since it was read."""


@dataclass(frozen=True)
class Location:
    """A path on a filesystem, printable as the URI the user gave.

    Fields:
      fs:   the pyarrow filesystem
      path: the path on it (no scheme; for S3 "bucket/key")
      uri:  the URI as shown in messages (never with credentials, never with a query)
      endpoint: for messages: the S3 endpoint in use ("" for local files)
      s3:   for S3, the settings it was made with (credentials hidden from repr)
    """

    fs: pafs.FileSystem
    path: str
    uri: str
    endpoint: str = ""
    s3: _s3.S3Target | None = field(default=None, repr=False, compare=False)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def portable_uri(self) -> str:
        """The URI to hand to another process: an absolute path for local files; for S3 the short
        URI plus the settings given explicitly (``?endpoint_override=…&scheme=…&region=…&profile=…``).
        Never credentials."""
        if self.is_local:
            return self.path
        query = _s3.portable_query(self.s3.given) if self.s3 is not None else ""
        return f"{self.uri}?{query}" if query else self.uri

    def __reduce__(self):
        # pickled (e.g. into a Ray task) as its portable URI: the settings travel, credentials do not
        return location, (self.portable_uri,)

    def join(self, *parts: str) -> Location:
        sep = "/" if not self.uri.endswith("/") else ""
        rel = "/".join(parts)
        return Location(self.fs, posixpath.join(self.path, rel), self.uri + sep + rel, self.endpoint, self.s3)

    def parent(self) -> Location:
        path = posixpath.dirname(self.path.rstrip("/"))
        uri = self.uri.rstrip("/").rsplit("/", 1)[0]
        return Location(self.fs, path, uri, self.endpoint, self.s3)

    def relative_to(self, root: Location) -> str | None:
        """This location's path below ``root`` (``"a/b"``), or None if it is not below it."""
        if self.is_local != root.is_local or (not self.is_local and self.endpoint != root.endpoint):
            return None
        base = root.path.rstrip("/") + "/"
        return self.path[len(base):] if self.path.startswith(base) else None

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def key(self) -> str:
        """For S3: the object key (the path without the bucket)."""
        return self.path.split("/", 1)[1] if "/" in self.path else ""

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    # -- queries --------------------------------------------------------------------------
    def info(self) -> pafs.FileInfo:
        return _call(self, "inspect", lambda: self.fs.get_file_info(self.path))

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def check_bucket(self) -> None:
        """Raise a clear error if this S3 location's bucket does not exist (no-op for local paths)."""
        if not self.is_local and not _bucket_exists(self):
            raise StorageError(f"{self.uri}: bucket {self.bucket!r} does not exist at {self.endpoint}")

    def list(self, recursive: bool = False) -> list[Location]:
        """Files below this location (sorted by path)."""
        return [loc for loc, _ in self.sizes(recursive)]

    def sizes(self, recursive: bool = False) -> list[tuple[Location, int]]:
        """Files below this location with their sizes in bytes (sorted by path; one listing, no
        request per file)."""
        sel = pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive)
        infos = _call(self, "list", lambda: self.fs.get_file_info(sel))
        out = []
        for i in sorted(infos, key=lambda i: i.path):
            if i.type == pafs.FileType.File:
                rel = i.path[len(self.path.rstrip("/")) + 1:]
                out.append((self.join(rel), i.size))
        return out

    # -- reading ------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path, compression=None) as f:  # bytes as stored (no .gz magic)
                return f.read()
        return _call(self, "read", read)

    def read_buffer(self) -> pa.Buffer:
        """The whole object as an Arrow buffer: a local file memory-mapped (no copy; files here are
        replaced by rename, never rewritten in place), an S3 object read into Arrow's memory pool
        (a large one in parallel ranged GETs, :data:`PART_BYTES` each)."""
        def read() -> pa.Buffer:
            if self.is_local:
                with pa.memory_map(self.path) as f:
                    return f.read_buffer()
            with self.fs.open_input_file(self.path) as f:
                size = f.size()
                return f.read_buffer() if size <= 2 * PART_BYTES else _read_parts(f, size)
        return _call(self, "read", read)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def open_random_access(self) -> pafs.NativeFile:
        """A seekable reader (ranged GETs on S3), e.g. to read some row groups of a Parquet file."""
        return _call(self, "open", lambda: self.fs.open_input_file(self.path))

    # -- writing ------------------------------------------------------------------------
    def write_bytes(self, data: bytes | memoryview | pa.Buffer, *, overwrite: bool = False) -> None:
        """Write atomically: readers see the old object, or none, or the whole new one.

        Without ``overwrite`` the write is create-only (:class:`Conflict` if the object exists).
        """
        if self.is_local:
            self._local_write(data, overwrite=overwrite)  # create-only by os.link
        elif not overwrite and len(data) <= ATOMIC_MAX:
            self.create(data)  # one conditional PUT (counted there)
            return
        else:
            if not overwrite and self.exists():
                raise Conflict(f"{self.uri}: already exists; refusing to overwrite it")
            def write() -> None:
                # the object appears only when the upload completes: an upload cut off half-way
                # leaves nothing behind (S3 multipart uploads are invisible until completed)
                with self.fs.open_output_stream(self.path, compression=None) as f:
                    f.write(data)
            _call(self, "write", write)
        _wrote(self)

    def write_text(self, text: str, *, overwrite: bool = False) -> None:
        self.write_bytes(text.encode("utf-8"), overwrite=overwrite)

    def create(self, data: bytes | memoryview | pa.Buffer) -> str:
        """Create the object, atomically, only if it does not exist; returns its ETag.

        Raises :class:`Conflict` if it exists (on S3, unless a retried request finds its own
        first attempt's bytes there: a response lost on the way back).
        """
        raw = bytes(data)
        if self.is_local:
            self._local_write(raw, overwrite=False)
            _wrote(self)
            return _local_etag(raw)
        attempts = [0]

        def put() -> str:
            attempts[0] += 1
            return _s3.put_object(self.s3.options, self.bucket, self.key, raw, if_none_match=True)
        try:
            etag = _call(self, "create", put)
        except _s3.PreconditionFailed as e:
            current = self.read_versioned() if (e.retried or attempts[0] > 1) else None
            if current is None or current[0] != raw:
                raise Conflict(f"{self.uri}: already exists; refusing to overwrite it") from None
            etag = current[1]
        _wrote(self)
        return etag

    def read_versioned(self) -> tuple[bytes, str] | None:
        """The object's bytes and ETag (the version a :meth:`replace` compares against), or None."""
        if self.is_local:
            try:
                with open(self.path, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                return None
            except OSError as e:
                raise StorageError(f"{self.uri}: cannot read ({_short(e)})") from None
            return raw, _local_etag(raw)
        return _call(self, "read", lambda: _s3.get_object(self.s3.options, self.bucket, self.key))

    def replace(self, data: bytes | memoryview | pa.Buffer, *, if_match: str) -> str:
        """Compare-and-swap: overwrite the object only if its ETag is still ``if_match``; returns
        the new ETag. Raises :class:`Conflict` if it changed (or is gone) meanwhile."""
        raw = bytes(data)
        if self.is_local:
            with _dir_lock(self):
                current = self.read_versioned()
                if current is None or current[1] != if_match:
                    raise Conflict(f"{self.uri}: changed since it was read; not replaced")
                self._local_write(raw, overwrite=True)
            _wrote(self)
            return _local_etag(raw)
        attempts = [0]

        def put() -> str:
            attempts[0] += 1
            return _s3.put_object(self.s3.options, self.bucket, self.key, raw, if_match=if_match)
        try:
            etag = _call(self, "replace", put)
        except _s3.PreconditionFailed as e:
            current = self.read_versioned() if (e.retried or attempts[0] > 1) else None
            if current is None or current[0] != raw:
                raise Conflict(f"{self.uri}: changed since it was read; not replaced") from None
            etag = current[1]
        _wrote(self)
        return etag

    def delete(self) -> None:
        _call(self, "delete", lambda: self.fs.delete_file(self.path))
        _wrote(self)

    def _local_write(self, data, *, overwrite: bool) -> None:
        parent = os.path.dirname(self.path)
        tmp = os.path.join(parent, f".{os.path.basename(self.path)}.{uuid.uuid4().hex}.tmp")
        try:
            os.makedirs(parent, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # a file where a folder of the path should be
            raise StorageError(f"{self.uri}: cannot write (a part of its folder path is a file, not a folder)") \
                from None
        except OSError as e:
            raise StorageError(f"{self.uri}: cannot write ({e.strerror or e})") from e
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp, self.path)
            else:
                os.link(tmp, self.path)  # fails if the name was taken meanwhile
        except FileExistsError:
            raise Conflict(f"{self.uri}: already exists; refusing to overwrite it") from None
        except OSError as e:
            raise StorageError(f"{self.uri}: cannot write ({e.strerror or e})") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _local_etag(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


class _dir_lock:
    """An exclusive lock on a local file's directory (flock), for compare-and-swap between processes."""

    def __init__(self, loc: Location) -> None:
        self.dir = os.path.dirname(loc.path)

    def __enter__(self) -> None:
        import fcntl
        os.makedirs(self.dir, exist_ok=True)
        self.fd = os.open(self.dir, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        import fcntl
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


# -- the fault hook: die after the k-th write ------------------------------------------------------
_writes = 0
_writes_lock = threading.Lock()


def _fault_at() -> int | None:
    raw = environment.fault_after_write()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise InputError(f"{FAULT_ENV} must be an integer >= 1, got {raw!r}")
    return int(raw)


def _wrote(loc: Location) -> None:
    """Count a completed write; the fault hook kills the process after the k-th."""
    global _writes
    with _writes_lock:
        _writes += 1
        n = _writes
    if n == _fault_at():
        sys.stderr.write(f"fault hook: killed after storage write {n} ({loc.uri})\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def writes_done() -> int:
    """Storage writes completed by this process so far (what the fault hook counts)."""
    return _writes


_TRANSIENT = ("NETWORK_CONNECTION", "SLOW_DOWN", "INTERNAL_FAILURE", "SERVICE_UNAVAILABLE", "THROTTLING",
              "REQUEST_TIMEOUT", "Timeout", "timed out", "Connection reset", "curlCode: 28", "curlCode: 56")
_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "AccessDenied",
           "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")
RETRIES = 3  # attempts at this level, on top of the S3 client's own retries of single requests


class ShortRead(OSError):
    """A ranged read returned fewer bytes than asked for: transient (:func:`_call` reads again)."""


def _read_parts(f: pafs.NativeFile, size: int) -> pa.Buffer:
    """``size`` bytes of an open S3 object in ranged reads of :data:`PART_BYTES`, up to
    :data:`PART_READERS` at once (``read_at`` is thread-safe and moves no shared position), into one
    buffer of Arrow's pool (Arrow-owned: see ``datasets._read_table`` on Python-owned buffers)."""
    out = pa.allocate_buffer(size)
    view = np.frombuffer(out, dtype=np.uint8)

    def part(offset: int) -> None:
        n = min(PART_BYTES, size - offset)
        got = f.read_at(n, offset)
        if len(got) != n:  # the object changed or the connection ended early: never a partial buffer
            raise ShortRead(f"short read, {len(got)} of {n} bytes at offset {offset}")
        view[offset:offset + n] = np.frombuffer(got, dtype=np.uint8)

    offsets = range(0, size, PART_BYTES)
    with ThreadPoolExecutor(min(PART_READERS, len(offsets)), thread_name_prefix="s3-read") as pool:
        for _ in pool.map(part, offsets):  # the first failure raises here
            pass
    return out


def _call(loc: Location, what: str, fn):
    """Run a filesystem operation; retry transient failures (bounded); translate errors."""
    for attempt in range(RETRIES):
        try:
            return fn()
        except FileNotFoundError:
            if not loc.is_local and what != "inspect" and not _bucket_exists(loc):
                raise StorageError(f"{loc.uri}: bucket {loc.bucket!r} does not exist at {loc.endpoint}") from None
            raise StorageError(f"{loc.uri}: not found") from None
        except PermissionError as e:
            raise StorageError(f"{loc.uri}: permission denied ({_short(e)})") from None
        except OSError as e:
            msg = str(e)
            if loc.is_local:
                raise StorageError(f"{loc.uri}: cannot {what} ({_short(e)})") from None
            if any(k in msg for k in _DENIED):
                raise StorageError(f"{loc.uri}: access denied by {loc.endpoint}; check the credentials "
                                   "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS profile)") from None
            if "NO_SUCH_BUCKET" in msg or "NoSuchBucket" in msg:
                raise StorageError(f"{loc.uri}: bucket {loc.bucket!r} does not exist at {loc.endpoint}") from None
            if (isinstance(e, ShortRead) or any(k in msg for k in _TRANSIENT)) and attempt < RETRIES - 1:
                time.sleep(0.25 * 2 ** attempt)
                continue
            if "NETWORK_CONNECTION" in msg or "curlCode" in msg:
                raise StorageError(f"{loc.uri}: cannot reach the S3 endpoint {loc.endpoint} "
                                   f"after {RETRIES} attempts ({_aws_detail(msg)})") from None
            raise StorageError(f"{loc.uri}: cannot {what} ({_aws_detail(msg)})") from None
    raise AssertionError("unreachable")


def _bucket_exists(loc: Location) -> bool:
    try:
        return loc.fs.get_file_info(loc.bucket).type != pafs.FileType.NotFound
    except OSError:
        return True  # cannot tell; report the object as missing


def _aws_detail(msg: str) -> str:
    """The informative part of an AWS SDK error (the error code and its text)."""
    msg = " ".join(msg.split())
    if "AWS Error" in msg:
        msg = "AWS Error" + msg.split("AWS Error", 1)[1]
    return msg[:200]


def _short(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def location(uri: str | os.PathLike | Location) -> Location:
    """The :class:`Location` of a URI: ``s3://bucket/prefix``, ``file:///path`` or a plain path.

    A URI holding credentials — userinfo (``s3://KEY:SECRET@bucket/x``, ``s3://KEY@bucket``) or a
    credential in its query (``?secret_key=…``) — is refused (:class:`InputError`, exit 2) with a
    message that does not repeat them: credentials come from the AWS settings, never from a location.
    """
    if isinstance(uri, Location):
        return uri
    uri = os.fspath(uri)
    if not uri:
        raise InputError("empty location; expected a path, file:///path or s3://bucket/prefix")
    shown = _s3.shown(uri)
    try:
        parsed = urlparse(uri)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise InputError(f"{shown!r}: not a valid location; expected a path, file:///path or s3://bucket/prefix") \
            from None
    if "://" in uri and "@" in parsed.netloc:
        raise InputError(f"{shown}: {_s3.CREDENTIALS_REFUSED}")
    if parsed.scheme == "s3":
        return s3_location(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InputError(f"{shown!r}: a file URI names an absolute local path (file:///path/to/x); for a "
                             "relative path leave out file://")
        if parsed.query or parsed.fragment or "?" in uri or "#" in uri:
            raise InputError(f"{shown!r}: a file URI takes no query or fragment (write '?' as %3F and '#' as %23, "
                             "or give a plain path)")
        path = unquote(parsed.path)  # file:///my%20data/x.parquet is "/my data/x.parquet"
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = uri
    else:
        raise InputError(f"unsupported location {shown!r}; expected a path, file:///path or s3://bucket/prefix")
    path = os.path.abspath(os.path.expanduser(path))
    return Location(pafs.LocalFileSystem(), path, uri)


def s3_location(uri: str, options: _s3.S3Options | None = None) -> Location:
    """The :class:`Location` of ``s3://bucket/prefix[?endpoint_override=…&scheme=…&region=…&profile=…]``;
    ``options`` (default: :func:`~.s3.configure_s3`'s) come below the URI's query."""
    t = _s3.parse_s3_uri(uri, options)
    path = f"{t.bucket}/{t.key}" if t.key else t.bucket
    return Location(_s3.filesystem(t.options), path, t.shown, t.endpoint_label, t)


def portable_uri(uri: str | os.PathLike | Location) -> str:
    """:attr:`Location.portable_uri` of a URI or location (what to hand to another process)."""
    return location(uri).portable_uri


def stored_location(uri: str, *, relative_to: Location) -> Location:
    """The location of a URI read back from storage (a manifest's data, a version record's cache):
    its storage settings are not taken from the stored text — whoever could edit that record could
    otherwise send this process's signed requests (and its access key id) to a host of theirs. An
    S3 URI is reached with the settings of ``relative_to`` (the location the record was read from,
    made by the operator); any query it carries is dropped. A local path stays as is.

    Args:
      uri: the stored URI.
      relative_to: where it was read from.

    Returns:
      The :class:`Location`.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        bare = f"s3://{parsed.netloc}{parsed.path}"
        base = relative_to.s3.given if relative_to.s3 is not None else _s3.configured()
        return s3_location(bare, base)
    return location(uri)


def overlap(a: Location, b: Location) -> str | None:
    """How ``a`` and ``b`` overlap: ``"is"``, ``"inside"`` (a lies inside b), ``"contains"``, or None
    (local paths with symbolic links resolved; S3 by endpoint, bucket and key)."""
    if a.is_local != b.is_local or (not a.is_local and a.endpoint != b.endpoint):
        return None
    pa_, pb = (os.path.realpath(x.path) if x.is_local else x.path.rstrip("/") for x in (a, b))
    if pa_ == pb:
        return "is"
    if pa_.startswith(pb.rstrip("/") + "/"):
        return "inside"
    if pb.startswith(pa_.rstrip("/") + "/"):
        return "contains"
    return None


_log = logging.getLogger("deltagrad_ray")
_ignored_once: set[tuple[str, str]] = set()


def recorded_location(uri: str, read_from: Location | None = None) -> Location:
    """The :class:`Location` of a URI read back from a stored record (the data URI of a cache's
    manifest, a parent cache), which must not decide where this process sends credentials.

    The rule: a stored ``s3://`` URI's own storage settings (its query: endpoint, scheme, region,
    profile) are used only when they equal the settings the operator gave this process
    (:func:`~.s3.configure_s3`: ``--endpoint-url``/``--region``/``--profile``, a config's ``s3:``
    block) or those of ``read_from``, the location the record was read from (whose settings the
    operator gave: its query, or this process's). Otherwise they are ignored — one warning line
    says so — and the URI resolves as if it had none: with this process's settings, then the
    environment's. A record edited to say ``?endpoint_override=elsewhere&scheme=http`` thus never
    makes the process sign requests (access key id included) for another host. Stored local paths
    and stored URIs without settings resolve as :func:`location` does; credentials in a stored URI
    are refused like anywhere else.

    Args:
      uri: the URI as stored.
      read_from: the location the record was read from (e.g. the cache's root), if any.

    Returns:
      The location to read.

    >>> recorded_location("s3://b/data?endpoint_override=10.0.0.9:80&scheme=http").portable_uri
    's3://b/data'
    """
    uri = os.fspath(uri)
    if urlparse(uri).scheme != "s3":
        return location(uri)
    own = _s3.query_options(uri)
    if own == _s3.S3Options():  # no settings of its own
        return s3_location(uri)
    trusted = [_s3.configured().shareable()]
    if read_from is not None and read_from.s3 is not None:
        trusted.append(read_from.s3.given)
    if any(own == t for t in trusted):
        return s3_location(uri)  # its settings are the operator's
    loc = s3_location(_s3.shown(uri))
    recorded = _s3.portable_query(own)
    used = loc.s3.options
    same = all(getattr(own, f) in (None, getattr(used, f)) for f in ("endpoint", "region", "profile"))
    if not same and (loc.uri, recorded) not in _ignored_once:
        _ignored_once.add((loc.uri, recorded))
        _log.warning(f"{loc.uri}: the S3 settings stored with this location ({recorded}) are not the ones given "
                     f"to this run, and are ignored (stored records do not choose where credentials go); reading "
                     f"it at {loc.endpoint}; give --endpoint-url (or the s3: settings) to use another endpoint")
    return loc
