"""S3 (and any S3-compatible endpoint): settings, pyarrow filesystems, and boto3 conditional writes.

Settings come, in order of precedence, from the URI's query (``?endpoint_override=host:port&
scheme=http&region=…&profile=…``: pyarrow's own form, plus ``profile``), from
:func:`configure_s3` (the CLI's flags, a pipeline config's ``s3`` block), and from the standard
AWS settings: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the AWS config and credentials files. pyarrow
itself ignores the endpoint variables (FIELD_NOTES); this module is why
``AWS_ENDPOINT_URL=http://127.0.0.1:9000 deltagrad-ray train … --cache s3://bucket/run1`` works.

The non-secret settings given explicitly (the URI's query, :func:`configure_s3`) travel with a
location: :func:`portable_query` prints them in the URI's query form, so that a Ray actor or a
later run on another machine resolves the same endpoint, region and profile. Settings found in
the environment stay there: every process reads its own. Credentials never travel and are
never printed (:class:`S3Options` hides them from its repr).

pyarrow cannot send ``If-None-Match`` / ``If-Match``; the few small control objects that need
an atomic create or a compare-and-swap go through boto3 (:func:`put_object`, :func:`get_object`).
This module knows nothing of :class:`~.location.Location`, which builds on it.
"""

from __future__ import annotations

import configparser
import os
import threading
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qs, quote, urlparse

import pyarrow.fs as pafs

from ..core.errors import InputError

_ENV_KEYS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
             "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE",
             "AWS_SHARED_CREDENTIALS_FILE")
QUERY_KEYS = ("endpoint_override", "scheme", "region", "profile")


@dataclass(frozen=True)
class S3Options:
    """How to reach S3. Fields left None fall back to the AWS settings of the environment.

    Fields:
      endpoint:   ``http://host:port`` or ``https://host`` of an S3-compatible service
      region:     e.g. ``us-east-1``
      access_key, secret_key, session_token: static credentials (hidden from repr)
      profile:    profile in the AWS config/credentials files
      connect_timeout, request_timeout: seconds
      max_attempts: attempts per request, for transient failures (bounded retry)
    """

    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    profile: str | None = None
    connect_timeout: float = 5.0
    request_timeout: float = 60.0
    max_attempts: int = 4

    def shareable(self) -> S3Options:
        """Only the settings that may travel: endpoint, region, profile (no credentials)."""
        return S3Options(endpoint=self.endpoint, region=self.region, profile=self.profile)


_configured = S3Options()
_cache: dict[tuple, pafs.S3FileSystem] = {}
_clients: dict[tuple, object] = {}
_lock = threading.Lock()


def configure_s3(options: S3Options | None = None, **overrides) -> None:
    """Set process-wide S3 options (e.g. from CLI flags); None fields still fall back to the environment.

    The endpoint, region and profile set here are carried by every S3 location made afterwards
    (:func:`portable_query`), so they reach Ray actors and later runs too.
    """
    global _configured
    _configured = replace(options or S3Options(), **overrides)


def configured() -> S3Options:
    """The process-wide options of :func:`configure_s3`."""
    return _configured


def _aws_file(path_env: str, default: str, env) -> configparser.ConfigParser:
    cp = configparser.ConfigParser()
    path = env.get(path_env) or os.path.expanduser(default)
    try:
        cp.read(path)
    except configparser.Error:
        pass
    return cp


def resolve(options: S3Options | None = None, environ: dict | None = None) -> S3Options:
    """Fill the unset fields of ``options`` from the AWS environment variables and files."""
    env = os.environ if environ is None else environ
    o = options or _configured
    profile = o.profile or env.get("AWS_PROFILE") or "default"
    cfg = _aws_file("AWS_CONFIG_FILE", "~/.aws/config", env)
    section = "default" if profile == "default" else f"profile {profile}"
    prof = cfg[section] if cfg.has_section(section) else {}
    creds = _aws_file("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials", env)
    cred = creds[profile] if creds.has_section(profile) else {}
    endpoint = (o.endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
                or prof.get("endpoint_url"))
    region = o.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or prof.get("region")
    access = o.access_key or env.get("AWS_ACCESS_KEY_ID") or cred.get("aws_access_key_id")
    secret = o.secret_key or env.get("AWS_SECRET_ACCESS_KEY") or cred.get("aws_secret_access_key")
    token = o.session_token or env.get("AWS_SESSION_TOKEN") or cred.get("aws_session_token")
    return replace(o, endpoint=endpoint, region=region, access_key=access, secret_key=secret,
                   session_token=token, profile=None if profile == "default" else profile)


@dataclass(frozen=True)
class S3Target:
    """An ``s3://`` URI taken apart.

    Fields:
      bucket, key: where the object or prefix is
      shown:    ``s3://bucket/key``, for messages (no query, no credentials)
      given:    the non-secret settings given explicitly (URI query, :func:`configure_s3`, arguments)
      options:  the settings in effect (``given`` filled from the environment; holds credentials)
    """

    bucket: str
    key: str
    shown: str
    given: S3Options
    options: S3Options

    @property
    def endpoint_label(self) -> str:
        """The endpoint, for messages."""
        return self.options.endpoint or f"AWS S3 ({self.options.region or 'us-east-1'})"


def parse_s3_uri(uri: str, options: S3Options | None = None) -> S3Target:
    """``s3://bucket/prefix[?endpoint_override=host:port&scheme=http&region=…&profile=…]``.

    ``options`` (default: those of :func:`configure_s3`) come below the URI's query.
    """
    parsed = urlparse(uri)
    bucket = parsed.netloc
    if not bucket:
        raise InputError(f"{uri!r}: an S3 location needs a bucket, e.g. s3://bucket/prefix")
    q = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    unknown = sorted(set(q) - set(QUERY_KEYS))
    if unknown:
        raise InputError(f"{uri!r}: unknown S3 setting {unknown[0]!r} in the query; "
                         f"expected {', '.join(QUERY_KEYS)}")
    if "scheme" in q and q["scheme"] not in ("http", "https"):
        raise InputError(f"{uri!r}: scheme must be http or https, got {q['scheme']!r}")
    base = options if options is not None else _configured
    given = base
    if "endpoint_override" in q:
        given = replace(given, endpoint=f"{q.get('scheme', 'https')}://{q['endpoint_override']}")
    if "region" in q:
        given = replace(given, region=q["region"])
    if "profile" in q:
        given = replace(given, profile=q["profile"])
    key = parsed.path.lstrip("/").rstrip("/")
    shown = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    return S3Target(bucket, key, shown, given.shareable(), resolve(given))


def portable_query(given: S3Options) -> str:
    """The query form of the shareable settings (``endpoint_override=…&scheme=…&region=…&profile=…``)."""
    parts = []
    if given.endpoint:
        parsed = urlparse(given.endpoint if "://" in given.endpoint else "https://" + given.endpoint)
        parts += [("endpoint_override", parsed.netloc + parsed.path.rstrip("/")), ("scheme", parsed.scheme)]
    if given.region:
        parts.append(("region", given.region))
    if given.profile:
        parts.append(("profile", given.profile))
    return "&".join(f"{k}={quote(v, safe=':/.-_')}" for k, v in parts)


def filesystem(o: S3Options) -> pafs.S3FileSystem:
    """The pyarrow filesystem of resolved options (one per distinct setting, shared by threads)."""
    key = (o.endpoint, o.region, o.access_key, o.secret_key, o.session_token, o.connect_timeout,
           o.request_timeout, o.max_attempts)
    with _lock:
        fs = _cache.get(key)
        if fs is None:
            kw: dict = {"connect_timeout": o.connect_timeout, "request_timeout": o.request_timeout,
                        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=o.max_attempts),
                        "region": o.region or "us-east-1"}
            if o.endpoint:
                parsed = urlparse(o.endpoint if "://" in o.endpoint else "https://" + o.endpoint)
                kw["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
                kw["scheme"] = parsed.scheme
            if o.access_key and o.secret_key:
                kw.update(access_key=o.access_key, secret_key=o.secret_key, session_token=o.session_token)
            fs = pafs.S3FileSystem(**kw)
            _cache[key] = fs
        return fs


# -- boto3: the conditional writes pyarrow cannot make ------------------------------------------------

class PreconditionFailed(Exception):
    """S3 answered 412: the object exists (If-None-Match) or changed (If-Match).

    ``retried``: the client had sent the request more than once, so the object it found may be
    this request's own first attempt (a response lost on the way back).
    """

    def __init__(self, code: str, retried: bool) -> None:
        super().__init__(code)
        self.retried = retried


def _client(o: S3Options):
    """A boto3 S3 client for resolved options (thread-safe; one per distinct setting)."""
    key = (o.endpoint, o.region, o.access_key, o.secret_key, o.session_token, o.profile, o.connect_timeout,
           o.request_timeout, o.max_attempts)
    with _lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config
            cfg = Config(connect_timeout=o.connect_timeout, read_timeout=o.request_timeout,
                         retries={"max_attempts": o.max_attempts, "mode": "standard"})
            if o.access_key and o.secret_key:
                session = boto3.session.Session(aws_access_key_id=o.access_key, aws_secret_access_key=o.secret_key,
                                                aws_session_token=o.session_token)
            else:  # the profile, or the default chain (instance profile, IRSA web identity, …)
                session = boto3.session.Session(profile_name=o.profile) if o.profile else boto3.session.Session()
            client = session.client("s3", endpoint_url=o.endpoint, region_name=o.region or "us-east-1", config=cfg)
            _clients[key] = client
        return client


def _os_error(e: Exception) -> OSError:
    """A boto3 failure as the OSError text :func:`~.location._call` translates (codes kept)."""
    from botocore.exceptions import ClientError, NoCredentialsError, ReadTimeoutError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    if isinstance(e, NoCredentialsError):
        return OSError("AWS Error AccessDenied: no credentials found")
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        return OSError(f"AWS Error {err.get('Code', 'unknown')} during {e.operation_name}: {err.get('Message', '')}")
    if isinstance(e, (BotoConnectionError, ReadTimeoutError)):
        return OSError(f"NETWORK_CONNECTION: {e}")
    return OSError(str(e))


def put_object(o: S3Options, bucket: str, key: str, data: bytes, *, if_none_match: bool = False,
               if_match: str | None = None) -> str:
    """One PUT, optionally conditional; returns the new ETag. Raises :class:`PreconditionFailed` on 412."""
    from botocore.exceptions import BotoCoreError, ClientError
    kw: dict = {}
    if if_none_match:
        kw["IfNoneMatch"] = "*"
    if if_match is not None:
        kw["IfMatch"] = if_match
    try:
        return _client(o).put_object(Bucket=bucket, Key=key, Body=bytes(data), **kw)["ETag"]
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        meta = e.response.get("ResponseMetadata", {})
        status, retried = meta.get("HTTPStatusCode"), int(meta.get("RetryAttempts", 0) or 0) > 0
        if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise PreconditionFailed(code, retried) from None
        if status == 404 and if_match is not None:  # compared against an object that is gone
            raise PreconditionFailed("NoSuchKey", retried) from None
        raise _os_error(e) from None
    except BotoCoreError as e:
        raise _os_error(e) from None


def get_object(o: S3Options, bucket: str, key: str) -> tuple[bytes, str] | None:
    """The object's bytes and ETag, or None if there is none."""
    from botocore.exceptions import BotoCoreError, ClientError
    try:
        r = _client(o).get_object(Bucket=bucket, Key=key)
        return r["Body"].read(), r["ETag"]
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise _os_error(e) from None
    except BotoCoreError as e:
        raise _os_error(e) from None


_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def environment_for_workers() -> dict[str, str]:
    """The non-secret AWS settings of this process (endpoint, region, profile, config paths), to
    pass to remote workers (a Ray runtime_env). Credentials are never passed this way — a
    runtime_env is shown in job details — workers get them from their own environment (instance
    profile, Kubernetes secret, or the local processes they inherit it from)."""
    return {k: os.environ[k] for k in _ENV_KEYS if k in os.environ and k not in _SECRET_KEYS}
