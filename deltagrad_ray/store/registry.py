"""A models prefix: the published versions of one model, and which one is current.

Layout (under the prefix, e.g. a bulk erasure's ``output``)::

    LATEST.json            the pointer: the record of the published version
    versions/NNNN.json     the lineage: the record of every published version (create-only)

The lineage is the truth and LATEST the pointer. A version record names its cache by a ``key``
relative to the prefix (or, for a first version trained elsewhere, a URI whose storage settings
are ignored: :func:`~.location.stored_location`), the sha256 of its model, and its parent (version,
run, model sha256 and the sha256 of the parent's record: a hash chain). Everything read back is
checked: :meth:`Registry.read_latest` refuses (:class:`LineageError`, exit 3, naming the repair
command) a pointer that is missing while versions exist, older than the lineage, edited, or ahead
of it by more than the one version a run may have published without recording it yet; opening a
version's cache checks its model's sha256 against the record. So a version whose erasures were
published can never be silently replaced by an older one (whose model still holds the erased rows).

Every command that opens a cache accepts a models prefix in its place (:func:`resolve_cache`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
from dataclasses import dataclass, field, replace

from .cache import Cache, open_cache
from .cache_format import MANIFEST
from .location import Conflict, Location, StorageError, location, stored_location
from .records import Damaged, Fields, create, decode, dump, read

LATEST = "LATEST.json"
VERSIONS = "versions"
_VERSION_FILE = re.compile(r"(\d{4,})\.json")
METHODS = ("train", "deltagrad", "exact-retrain", "repaired")


class LineageError(StorageError):
    """LATEST.json disagrees with the lineage in ``versions/`` (missing, stale, edited): refused."""


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def repair_advice(root: Location) -> str:
    return f"run `deltagrad-ray erasure repair --output {root.uri}` to restore it from the lineage in versions/"


@dataclass(frozen=True)
class ParentVersion:
    """The version a version was built on.

    Fields:
      version, run_id, model_sha256: the parent's
      record_sha256: sha256 of the parent's record (None in records written before the hash chain)
    """

    version: int
    run_id: str | None
    model_sha256: str | None
    record_sha256: str | None = None

    def to_dict(self) -> dict:
        out = {"version": self.version, "run_id": self.run_id, "model_sha256": self.model_sha256}
        if self.record_sha256 is not None:
            out["record_sha256"] = self.record_sha256
        return out


@dataclass(frozen=True)
class VersionRecord:
    """One published version (``LATEST.json`` and ``versions/NNNN.json`` hold it).

    Fields:
      version:      0 for the trained model, +1 per published erasure
      run_id:       the run that published it
      cache:        the cache's URI (as shown; for a key below the prefix informative only)
      key:          the cache's location below the prefix (None: outside it, see ``cache``)
      model_sha256: sha256 of the cache's model file
      cache_run_id: the cache's own run id (its manifest's)
      method:       train | deltagrad | exact-retrain | repaired
      parent:       the version it was built on (None for version 0)
      applied:      requests applied
      published:    when (UTC, ISO 8601)
      erased:       distinct ids erased by this version
      certificate:  the replay's error statement (erasure runs; see :mod:`deltagrad_ray.erasure.run`)
      extra:        other fields kept as read (e.g. ``touched`` by an abandon)
    """

    version: int
    run_id: str
    cache: str
    key: str | None
    model_sha256: str
    cache_run_id: str | None
    method: str
    parent: ParentVersion | None
    applied: int = 0
    published: str = ""
    erased: int = 0
    certificate: dict | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        out = {"version": self.version, "run_id": self.run_id, "cache": self.cache, "key": self.key,
               "model_sha256": self.model_sha256, "cache_run_id": self.cache_run_id, "method": self.method,
               "parent": None if self.parent is None else self.parent.to_dict(), "applied": self.applied,
               "published": self.published, "erased": self.erased}
        if self.certificate is not None:
            out["certificate"] = self.certificate
        return {**self.extra, **out}

    def sha256(self) -> str:
        """sha256 of the record's content (``touched`` notes of an abandon left out): the hash chain."""
        d = self.to_dict()
        d.pop("touched", None)
        return "sha256:" + hashlib.sha256(dump(d)).hexdigest()

    def same_as(self, other: VersionRecord) -> bool:
        return self.sha256() == other.sha256()

    @classmethod
    def parse(cls, obj: dict, uri: str, advice: str) -> VersionRecord:
        f = Fields(obj, uri, "version record", advice)
        parent = f.sub("parent", optional=True)
        version = f.int("version", minimum=0)
        method = f.str("method")
        if method not in METHODS:
            raise Damaged(f"{uri}: damaged version record (method must be one of {', '.join(METHODS)}, got "
                          f"{method[:40]!r}); {advice}")
        p = None
        if parent is not None:
            p = ParentVersion(parent.int("version", minimum=0), parent.str("run_id", optional=True),
                              parent.str("model_sha256", optional=True), parent.str("record_sha256", optional=True))
            if p.version != version - 1:
                raise Damaged(f"{uri}: damaged version record (version {version} names parent version {p.version}); "
                              f"{advice}")
        elif version != 0:
            raise Damaged(f"{uri}: damaged version record (version {version} has no parent); {advice}")
        known = {"version", "run_id", "cache", "key", "model_sha256", "cache_run_id", "method", "parent", "applied",
                 "published", "erased", "certificate"}
        return cls(version, f.str("run_id"), f.str("cache"), f.key("key", optional=True),
                   f.str("model_sha256", pattern=re.compile(r"sha256:[0-9a-f]{64}")),
                   f.str("cache_run_id", optional=True), method, p, f.int("applied", minimum=0, optional=True) or 0,
                   f.str("published", optional=True) or "", f.int("erased", minimum=0, optional=True) or 0,
                   f.dict("certificate", optional=True), {k: v for k, v in obj.items() if k not in known})


class Registry:
    """The versions under a models prefix: the pointer, the lineage, and their caches.

    Args:
      output: the models prefix.
    """

    def __init__(self, output: str | Location) -> None:
        self.root = location(output)

    # -- reading, checked
    @property
    def advice(self) -> str:
        return repair_advice(self.root)

    @property
    def record_advice(self) -> str:
        """What to do about a damaged or edited record in ``versions/``: the lineage is the truth and
        nothing else holds it, so it comes back from a backup (LATEST.json is only a pointer)."""
        return (f"restore it from a backup or from the bucket's object versions (the records in "
                f"{self.root.join(VERSIONS).uri} are the lineage: nothing else holds them)")

    def _parse(self, raw: bytes, loc: Location) -> VersionRecord:
        advice = self.advice if loc.name == LATEST else self.record_advice
        return VersionRecord.parse(decode(raw, loc.uri, "version record", advice), loc.uri, advice)

    def version_file(self, version: int) -> Location:
        return self.root.join(VERSIONS, f"{version:04d}.json")

    def versions(self) -> list[int]:
        """The versions recorded in the lineage (file names only; nothing is read)."""
        out = []
        for f in self.root.join(VERSIONS).list():
            m = _VERSION_FILE.fullmatch(f.name)
            if m:
                out.append(int(m.group(1)))
            elif not f.name.startswith("."):
                raise Damaged(f"{f.uri}: not a version record (expected versions/NNNN.json); remove it or "
                              f"{self.advice}")
        return sorted(out)

    def recorded(self, version: int) -> VersionRecord | None:
        """``versions/NNNN.json``, checked (None if the lineage has no such record)."""
        loc = self.version_file(version)
        cur = loc.read_versioned()
        if cur is None:
            return None
        rec = self._parse(cur[0], loc)
        if rec.version != version:
            raise Damaged(f"{loc.uri}: damaged version record (it says version {rec.version}); {self.record_advice}")
        return rec

    def read_latest(self, check: bool = True) -> tuple[VersionRecord | None, str | None]:
        """The published version and LATEST.json's ETag ((None, None): nothing published).

        With ``check`` (always, except for :meth:`repair`) the pointer is checked against the lineage.

        Raises:
          LineageError: the pointer is missing while versions exist, older than the lineage, edited,
            or more than one version ahead of it.
          Damaged: LATEST.json or a version record is not a valid record.
        """
        loc = self.root.join(LATEST)
        cur = loc.read_versioned()
        rec = None if cur is None else self._parse(cur[0], loc)
        if check:
            self._check_pointer(rec)
        return (None, None) if cur is None else (rec, cur[1])

    def _check_pointer(self, rec: VersionRecord | None) -> None:
        versions = self.versions()
        top = versions[-1] if versions else None
        where = self.root.join(LATEST).uri
        if rec is None:
            if top is not None:
                raise LineageError(f"{where} is missing, but versions/ records version {top}; {self.advice}")
            return
        if top is None:
            if rec.version != 0:
                raise LineageError(f"{where} names version {rec.version}, but versions/ records none; {self.advice}")
            return
        if rec.version < top:
            raise LineageError(f"{where} names version {rec.version}, but the lineage records version {top}: the "
                               f"pointer is stale or was edited (an older model may still hold erased rows); "
                               f"{self.advice}")
        if rec.version == top:
            recorded = self.recorded(top)
            if not rec.same_as(recorded):
                raise LineageError(f"{where} differs from versions/{top:04d}.json (one of them was edited): if the "
                                   f"version record is intact, {self.advice}; if not, {self.record_advice}")
            return
        if rec.version > top + 1:
            raise LineageError(f"{where} names version {rec.version}, but the lineage ends at version {top}; "
                               f"{self.advice}")
        # published, not yet recorded in the lineage (a run stopped between the two writes): its parent
        # must be the lineage's last version
        parent = self.recorded(top)
        if (rec.parent is None or rec.parent.model_sha256 != parent.model_sha256
                or (rec.parent.record_sha256 is not None and rec.parent.record_sha256 != parent.sha256())):
            raise LineageError(f"{where}: version {rec.version} does not descend from versions/{top:04d}.json; "
                               f"{self.advice}")

    def latest(self) -> VersionRecord | None:
        return self.read_latest()[0]

    def version_record(self, version: int, latest: VersionRecord | None) -> VersionRecord | None:
        """The published record of ``version`` (from LATEST or ``versions/``), None if unpublished."""
        if latest is not None and latest.version == version:
            return latest
        if latest is None or latest.version < version:
            return None
        return self.recorded(version)

    def lineage(self) -> list[VersionRecord]:
        """Every published version, newest first, the hash chain checked."""
        latest = self.latest()
        if latest is None:
            return []
        out = [latest]
        for v in range(latest.version - 1, -1, -1):
            rec = self.recorded(v)
            if rec is None and v == 0 and out[-1].parent is not None and out[-1].parent.run_id is None:
                break  # written before version 0 was published too: the first cache was never a version
            if rec is None:
                raise LineageError(f"{self.version_file(v).uri} is missing from the lineage of version "
                                   f"{latest.version}; {self.record_advice}")
            child = out[-1]
            if child.parent is not None and (child.parent.model_sha256 != rec.model_sha256 or (
                    child.parent.record_sha256 is not None and child.parent.record_sha256 != rec.sha256())):
                raise LineageError(f"{self.version_file(v).uri} is not the parent version {child.version} names "
                                   f"(edited?); {self.record_advice}")
            out.append(rec)
        return out

    # -- the caches
    def resolve(self, record: VersionRecord) -> Location:
        """The cache a version record names: its key below the prefix, else its URI with the prefix's
        storage settings (a stored URI never decides where credentials go)."""
        if record.key:
            return self.root.join(record.key)
        return stored_location(record.cache, relative_to=self.root)

    def open(self, record: VersionRecord) -> Cache:
        """The version's cache, its model's sha256 checked against the record."""
        loc = self.resolve(record)
        cache = open_cache(loc)
        if cache.manifest.model_sha256() != record.model_sha256:
            raise Damaged(f"{loc.uri}: the cache's model (sha256 {cache.manifest.model_sha256()[7:19]}…) is not the "
                          f"one version {record.version} recorded ({record.model_sha256[7:19]}…): the cache or the "
                          f"record was changed; {self.advice}")
        return cache

    # -- writing
    def publish(self, record: VersionRecord, etag: str | None) -> str:
        """Make ``record`` the published version, only if LATEST.json is still at ``etag``
        (``None``: only if nothing was published). Raises :class:`Conflict` otherwise."""
        loc = self.root.join(LATEST)
        return loc.create(dump(record.to_dict())) if etag is None else loc.replace(dump(record.to_dict()),
                                                                                   if_match=etag)

    def record_version(self, record: VersionRecord | None) -> None:
        """The version's entry in the lineage (create-only; done once per version)."""
        if record is not None and not self.version_file(record.version).exists():
            d = record.to_dict()
            d.pop("touched", None)
            create(self.version_file(record.version), d)

    def new_record(self, cache: Cache, *, version: int, run_id: str, method: str, parent: VersionRecord | None,
                   applied: int = 0, erased: int = 0, certificate: dict | None = None) -> VersionRecord:
        """The record of ``cache`` as ``version`` of this prefix."""
        key = cache.root.relative_to(self.root)
        par = None if parent is None else ParentVersion(parent.version, parent.run_id, parent.model_sha256,
                                                        parent.sha256())
        return VersionRecord(version, run_id, cache.root.portable_uri if key is None else cache.root.uri, key,
                             cache.manifest.model_sha256(), cache.manifest.run_id, method, par, applied, now(),
                             erased, certificate)

    def repair(self) -> dict:
        """Point LATEST.json at the newest version of the lineage whose chain and cache check out.

        Returns:
          ``{"before": version or None, "after": version, "reason": …}``.
        """
        try:
            before, etag = self.read_latest(check=False)
        except Damaged:
            before, etag = None, self.root.join(LATEST).read_versioned()[1]
        versions = self.versions()
        if not versions:
            raise StorageError(f"{self.root.uri}: versions/ records no version; nothing to restore LATEST.json from")
        top = self.recorded(versions[-1])
        self.open(top)  # its cache must be there, with the recorded model
        if before is not None and before.same_as(top):
            return {"before": before.version, "after": top.version, "reason": "LATEST.json already agrees"}
        if before is not None and before.version == top.version + 1:
            try:
                self._check_pointer(before)
                return {"before": before.version, "after": before.version,
                        "reason": "LATEST.json is one version ahead of the lineage (recorded on the next run)"}
            except LineageError:
                pass
        restored = replace(top, extra={**top.extra, "touched": {"at": now(), "by": "erasure repair"}})
        if etag is None:
            self.root.join(LATEST).create(dump(restored.to_dict()))
        else:
            self.root.join(LATEST).replace(dump(restored.to_dict()), if_match=etag)
        return {"before": None if before is None else before.version, "after": top.version,
                "reason": "LATEST.json restored from versions/"}


def publish_initial(cache: str | Location | Cache, output: str | Location) -> VersionRecord:
    """Publish a trained cache as version 0 of ``output`` (its first LATEST.json).

    Downstream jobs then name ``output`` and read whatever version is published. Refused (a
    :class:`~.location.Conflict`) if ``output`` has published a version already.

    Returns:
      The version record.
    """
    reg = Registry(output)
    c = cache if isinstance(cache, Cache) else open_cache(cache)
    latest = reg.latest()
    if latest is not None:
        raise Conflict(f"{reg.root.uri}: version {latest.version} is published already; publish version 0 "
                       "of a new model under a new output prefix")
    record = reg.new_record(c, version=0, run_id=f"train-{c.manifest.run_id}", method="train", parent=None)
    try:
        reg.publish(record, None)
    except Conflict:
        raise Conflict(f"{reg.root.uri}: a version was published meanwhile; not replaced") from None
    reg.record_version(record)
    return record


def is_models_prefix(uri: str | Location) -> bool:
    loc = location(uri)
    return not loc.join(MANIFEST).exists() and (loc.join(LATEST).exists() or loc.join(VERSIONS).is_dir())


def resolve_cache(uri: str | Location) -> Location:
    """The cache a location means: itself if it holds a cache, the published version if it is a
    models prefix (its LATEST.json, checked against the lineage); anything else as is, for
    :func:`~.cache.open_cache` to explain."""
    loc = location(uri)
    if loc.join(MANIFEST).exists():
        return loc
    reg = Registry(loc)
    latest = reg.latest()
    return loc if latest is None else reg.resolve(latest)


def open_resolved(uri: str | Location | Cache) -> Cache:
    """An open cache: ``uri`` itself, or the published version of a models prefix (its model's sha256
    checked against the record)."""
    if isinstance(uri, Cache):
        return uri
    loc = location(uri)
    if loc.join(MANIFEST).exists():
        return open_cache(loc)
    reg = Registry(loc)
    latest = reg.latest()
    return open_cache(loc) if latest is None else reg.open(latest)


def read_record(loc: Location, advice: str) -> VersionRecord | None:
    """A version record at ``loc`` (e.g. in an audit), checked; None if absent."""
    obj = read(loc, "version record", advice)
    return None if obj is None else VersionRecord.parse(obj, loc.uri, advice)
