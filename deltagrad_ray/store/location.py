"""Locations: one URI scheme for every place the project reads or writes.

A :class:`Location` is a filesystem (``pyarrow.fs``) plus a path on it. ``file:///x``, a plain
path and (see :mod:`.s3`) ``s3://bucket/prefix`` all become a Location, and everything above
this module only calls Location methods — this is the one place that touches filesystems.

Writes are atomic per object: local files go to a temporary name and are renamed; S3 objects
appear only when their upload completes. Nothing here overwrites unless asked.
"""

from __future__ import annotations

import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from ..core.errors import InputError


class StorageError(RuntimeError):
    """A storage operation failed (missing object, unreachable endpoint, bad checksum, …)."""


@dataclass(frozen=True)
class Location:
    """A path on a filesystem, printable as the URI the user gave.

    Fields:
      fs:   the pyarrow filesystem
      path: the path on it (no scheme; for S3 "bucket/key")
      uri:  the URI as shown in messages (never with credentials)
    """

    fs: pafs.FileSystem
    path: str
    uri: str
    endpoint: str = ""  # for messages: the S3 endpoint in use ("" for local files)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> Location:
        sep = "/" if not self.uri.endswith("/") else ""
        rel = "/".join(parts)
        return Location(self.fs, posixpath.join(self.path, rel), self.uri + sep + rel, self.endpoint)

    def parent(self) -> Location:
        path = posixpath.dirname(self.path.rstrip("/"))
        uri = self.uri.rstrip("/").rsplit("/", 1)[0]
        return Location(self.fs, path, uri, self.endpoint)

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

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
        sel = pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive)
        infos = _call(self, "list", lambda: self.fs.get_file_info(sel))
        out = []
        for i in sorted(infos, key=lambda i: i.path):
            if i.type == pafs.FileType.File:
                rel = i.path[len(self.path.rstrip("/")) + 1:]
                out.append(self.join(rel))
        return out

    # -- reading ------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        return _call(self, "read", read)

    def read_buffer(self) -> pa.Buffer:
        """The whole object as an Arrow buffer (one copy, from Arrow's memory pool)."""
        def read() -> pa.Buffer:
            with self.fs.open_input_file(self.path) as f:
                return f.read_buffer()
        return _call(self, "read", read)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def open_random_access(self) -> pafs.NativeFile:
        """A seekable reader (ranged GETs on S3), e.g. to read some row groups of a Parquet file."""
        return _call(self, "open", lambda: self.fs.open_input_file(self.path))

    # -- writing ------------------------------------------------------------------------
    def write_bytes(self, data: bytes | memoryview | pa.Buffer, *, overwrite: bool = False) -> None:
        """Write atomically: readers see the old object, or none, or the whole new one."""
        if not overwrite and self.exists():
            raise StorageError(f"{self.uri}: already exists; refusing to overwrite it")
        if self.is_local:
            parent = os.path.dirname(self.path)
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".{os.path.basename(self.path)}.{uuid.uuid4().hex}.tmp")
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
                raise StorageError(f"{self.uri}: already exists; refusing to overwrite it") from None
            except OSError as e:
                raise StorageError(f"{self.uri}: cannot write ({e.strerror or e})") from e
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return

        def write() -> None:
            # the object appears only when the upload completes: an upload cut off half-way
            # leaves nothing behind (S3 multipart uploads are invisible until completed)
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
        _call(self, "write", write)

    def write_text(self, text: str, *, overwrite: bool = False) -> None:
        self.write_bytes(text.encode("utf-8"), overwrite=overwrite)

    def delete(self) -> None:
        _call(self, "delete", lambda: self.fs.delete_file(self.path))


_TRANSIENT = ("NETWORK_CONNECTION", "SLOW_DOWN", "INTERNAL_FAILURE", "SERVICE_UNAVAILABLE", "THROTTLING",
              "REQUEST_TIMEOUT", "Timeout", "timed out", "Connection reset", "curlCode: 28", "curlCode: 56")
_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "AccessDenied",
           "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")
RETRIES = 3  # attempts at this level, on top of the S3 client's own retries of single requests


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
            if any(k in msg for k in _TRANSIENT) and attempt < RETRIES - 1:
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
    """The :class:`Location` of a URI: ``s3://bucket/prefix``, ``file:///path`` or a plain path."""
    if isinstance(uri, Location):
        return uri
    uri = os.fspath(uri)
    if not uri:
        raise InputError("empty location; expected a path, file:///path or s3://bucket/prefix")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        from .s3 import s3_location
        return s3_location(uri)
    if parsed.scheme == "file":
        path = parsed.path
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = uri
    else:
        raise InputError(f"unsupported location {uri!r}; expected a path, file:///path or s3://bucket/prefix")
    path = os.path.abspath(os.path.expanduser(path))
    return Location(pafs.LocalFileSystem(), path, uri)
