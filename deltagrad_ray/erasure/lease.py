"""The lease on a model's output prefix (``output/_lease.json``): who works on it now, and until when.

A run takes the lease (created if absent; taken over by compare-and-swap on its ETag when
expired, released, or held by the same holder name), renews it while it works and releases it at
the end. A run that finds a live lease does nothing (:class:`LeaseBusy` names the holder and
expiry) or waits for it. The lease saves duplicate work; correctness does not depend on it
(publishing is a compare-and-swap, see :mod:`.run`).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from ..core.errors import InputError
from ..store.location import Conflict, Location, StorageError, location
from ..store.records import Damaged, Fields, decode, dump
from ..store.registry import now

LEASE = "_lease.json"


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class LeaseSettings:
    """How a run takes the lease on an output prefix (checked when built).

    Fields:
      ttl_s:  how long the lease lasts without renewal (renewed every ttl_s / 3 while working)
      wait_s: how long to wait for a live lease held by another run (0: give up at once)
      holder: this run's name in the lease (default: host:pid:random); a lease held by the same
        name is taken over at once (a rerun of the same job after a crash)
    """

    ttl_s: float = 300.0
    wait_s: float = 0.0
    holder: str | None = None

    def __post_init__(self) -> None:
        for name, value, low in (("ttl_s", self.ttl_s, 1), ("wait_s", self.wait_s, 0)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value >= low):
                raise InputError(f"lease {name} must be a finite number >= {low}, got {value!r}")
        if self.holder is not None and (not isinstance(self.holder, str) or not self.holder.strip()
                                        or len(self.holder) > 200):
            raise InputError(f"lease holder must be a non-empty name of at most 200 characters, got {self.holder!r}")


class LeaseBusy(Exception):
    """Another run holds the lease: nothing was done."""

    def __init__(self, uri: str, holder: str, expires: str) -> None:
        super().__init__(f"{uri}: another run holds the lease ({holder}, until {expires}); nothing done")
        self.uri, self.holder, self.expires = uri, holder, expires

    def __reduce__(self):  # crosses process boundaries (Ray) with its fields
        return type(self), (self.uri, self.holder, self.expires)


class LeaseLost(StorageError):
    """The lease expired or was taken over while this run worked: it stopped at a step boundary."""


def _advice(loc: Location) -> str:
    return (f"no run can hold a damaged lease: if no erasure is running on this output, delete {loc.uri} and run "
            "again")


def _parse(raw: bytes, loc: Location) -> dict:
    obj = decode(raw, loc.uri, "lease", _advice(loc))
    f = Fields(obj, loc.uri, "lease", _advice(loc))
    return {"holder": f.str("holder"), "expires_at": f.number("expires_at"), "expires": f.str("expires"),
            "released": bool(f.bool("released", optional=True)), "acquired": f.str("acquired", optional=True),
            "renewed": f.str("renewed", optional=True), "host": f.str("host", optional=True),
            "pid": f.int("pid", optional=True)}


class Lease:
    """The lease on an output prefix: acquire, renew in the background, release."""

    def __init__(self, output: str | Location, settings: LeaseSettings = LeaseSettings()) -> None:
        self.loc = location(output).join(LEASE)
        self.settings = settings
        self.holder = settings.holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.expires_at = 0.0
        self.lost: str | None = None
        self._acquired = now()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _record(self, acquired: str, released: bool = False) -> bytes:
        return dump({"holder": self.holder, "token": self.token, "acquired": acquired, "renewed": now(),
                     "expires": _iso(self.expires_at), "expires_at": self.expires_at,
                     "host": socket.gethostname(), "pid": os.getpid(), "released": released})

    def acquire(self) -> Lease:
        """Take the lease, waiting up to ``wait_s`` for a live one; raises :class:`LeaseBusy`."""
        deadline = time.time() + self.settings.wait_s
        while True:
            current = self.loc.read_versioned()
            now_t = time.time()
            self.expires_at = now_t + self.settings.ttl_s
            self._acquired = now()
            rec: dict = {}
            try:
                if current is None:
                    self.etag = self.loc.create(self._record(self._acquired))
                    break
                rec = _parse(current[0], self.loc)
                if rec["released"] or rec["expires_at"] < now_t or rec["holder"] == self.holder:
                    self.etag = self.loc.replace(self._record(self._acquired), if_match=current[1])
                    break
            except Conflict:
                continue  # another run moved first: look again
            if now_t >= deadline:
                raise LeaseBusy(self.loc.parent().uri, rec.get("holder", "?"), rec.get("expires", "?"))
            time.sleep(max(0.05, min(1.0, deadline - now_t, rec.get("expires_at", now_t) - now_t + 0.05)))
        self._thread = threading.Thread(target=self._renew_loop, name="erasure-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.settings.ttl_s / 3):
            try:
                self.renew()
            except Conflict:
                self.lost = "taken over by another run"
                return
            except StorageError:
                continue  # transient: the next tick tries again; check() sees the expiry

    def renew(self) -> None:
        with self._lock:
            if self.lost or self._stop.is_set():
                return
            self.expires_at = time.time() + self.settings.ttl_s
            self.etag = self.loc.replace(self._record(self._acquired), if_match=self.etag)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease is no longer this run's (called between steps)."""
        if self.lost:
            raise LeaseLost(f"{self.loc.uri}: the lease was {self.lost} while this run worked; stopped "
                            "(a later run resumes the open plan)")
        if time.time() > self.expires_at:
            raise LeaseLost(f"{self.loc.uri}: the lease expired at {_iso(self.expires_at)} (renewals failed); "
                            "stopped (a later run resumes the open plan)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.lost or self.etag is None:
                return
            try:
                self.loc.replace(self._record(self._acquired, released=True), if_match=self.etag)
            except Conflict:
                pass  # taken over already
            self.etag = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check(lease: Lease | None) -> None:
    """:meth:`Lease.check` when a lease is held."""
    if lease is not None:
        lease.check()


def read_lease(output: str | Location) -> dict | None:
    """The lease record of ``output`` with ``live`` (held and not expired), or None if never taken.

    Raises:
      Damaged: the lease file is not a valid lease (naming it and what to do).
    """
    loc = location(output).join(LEASE)
    cur = loc.read_versioned()
    if cur is None:
        return None
    rec = _parse(cur[0], loc)
    rec["live"] = not rec["released"] and rec["expires_at"] >= time.time()
    return rec


__all__ = ["LEASE", "Damaged", "Lease", "LeaseBusy", "LeaseLost", "LeaseSettings", "check", "read_lease"]
