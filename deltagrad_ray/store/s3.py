"""S3 (and any S3-compatible endpoint): settings, pyarrow filesystems, and boto3 conditional writes.

Settings come, in order of precedence, from the URI's query (``?endpoint_override=host:port&
scheme=http&region=…&profile=…``: pyarrow's own form, plus ``profile``), from
:func:`configure_s3` (the CLI's flags, a pipeline config's ``s3`` block), and from the standard
AWS settings: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the AWS config and credentials files. pyarrow
itself ignores the endpoint variables (docs/platform.md); this module is why
``AWS_ENDPOINT_URL=http://127.0.0.1:9000 deltagrad-ray train … --cache s3://bucket/run1`` works.

The non-secret settings given explicitly (the URI's query, :func:`configure_s3`) travel with a
location: :func:`portable_query` prints them in the URI's query form, so that a Ray actor or a
later run on another machine resolves the same endpoint, region and profile. Settings found in
the environment stay there: every process reads its own. Credentials never travel and are
never printed (:class:`S3Options` hides them from its repr): a URI or an endpoint holding
credentials (``s3://KEY:SECRET@bucket/x``, ``?secret_key=…``, ``http://KEY:SECRET@host:9000``) is
refused with a message that does not repeat them (:func:`shown`), and so is any query key other
than :data:`QUERY_KEYS`, whose value could be one.

pyarrow cannot send ``If-None-Match`` / ``If-Match``; the few small control objects that need
an atomic create or a compare-and-swap go through boto3 (:func:`put_object`, :func:`get_object`).
This module knows nothing of :class:`~.location.Location`, which builds on it.
"""

from __future__ import annotations

import configparser
import os
import threading
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl, quote, urlparse, urlsplit

import pyarrow.fs as pafs

from .. import environment
from ..core.errors import InputError

_ENV_KEYS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
             "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE",
             "AWS_SHARED_CREDENTIALS_FILE")
QUERY_KEYS = ("endpoint_override", "scheme", "region", "profile")
# query keys (lowercased, "-" as "_") that carry credentials: named in the refusal, which says where they belong
_CREDENTIAL_KEYS = ("access_key", "secret_key", "session_token", "aws_access_key_id", "aws_secret_access_key",
                    "aws_session_token", "access_key_id", "secret_access_key", "token", "password", "x_amz_credential",
                    "x_amz_signature", "x_amz_security_token", "signature", "sig", "credentials")
CREDENTIALS_REFUSED = ("credentials in a location are refused; use the AWS settings (AWS_ACCESS_KEY_ID / "
                       "AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN in the environment, a profile, an instance role)")


def shown(uri: str) -> str:
    """A URI as a message may show it, whatever it holds: userinfo as ``***@``, no query, no fragment.

    >>> shown("s3://KEY:SECRET@bucket/x?secret_key=S")
    's3://***@bucket/x'
    """
    uri = str(uri)
    if "://" not in uri:  # a plain path, or "KEY:SECRET@bucket/x" missing its scheme: up to the first ':'
        head, colon, _ = uri.partition(":")
        return f"{head}:***" if colon and ("@" in uri or "?" in uri) else uri.split("?", 1)[0].split("#", 1)[0]
    scheme, rest = uri.split("://", 1)
    cut = min([i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0], default=len(rest))
    netloc, path = rest[:cut], rest[cut:]
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return f"{scheme}://{netloc}{path.split('?', 1)[0].split('#', 1)[0]}"


def _key_shown(key: str) -> str:
    """A query key for a message: named when it reads as a setting's name, else not repeated."""
    import re
    return repr(key) if re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", key) else "(a key not shown)"


def check_endpoint(endpoint: str | None, where: str = "the S3 endpoint") -> str | None:
    """``endpoint`` (``http://host:port``, ``https://host``, or ``host:port`` for https) if it is one;
    an :class:`InputError` (not repeating it) if it holds credentials, a query or another scheme."""
    if endpoint is None or endpoint == "":
        return None
    text = str(endpoint).strip()
    full = text if "://" in text else "https://" + text
    try:
        parsed = urlsplit(full)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise InputError(f"{where} {shown(full)!r}: expected http://host:port or https://host") from None
    if "@" in parsed.netloc:
        raise InputError(f"{where} {shown(full)!r}: credentials in an endpoint are refused; use the AWS settings "
                         "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment, a profile, an instance role)")
    if parsed.query or parsed.fragment or "?" in full or "#" in full:
        raise InputError(f"{where} {shown(full)!r}: an endpoint takes no query or fragment; expected "
                         "http://host:port or https://host")
    if parsed.scheme not in ("http", "https") or not parsed.hostname or any(c.isspace() for c in text):
        raise InputError(f"{where} {shown(full)!r}: expected http://host:port or https://host")
    return text


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
    new = replace(options or S3Options(), **overrides)
    check_endpoint(new.endpoint)
    _configured = new


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
    env = environment.variables() if environ is None else environ
    o = options or _configured
    profile = o.profile or env.get("AWS_PROFILE") or "default"
    cfg = _aws_file("AWS_CONFIG_FILE", "~/.aws/config", env)
    section = "default" if profile == "default" else f"profile {profile}"
    prof = cfg[section] if cfg.has_section(section) else {}
    creds = _aws_file("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials", env)
    cred = creds[profile] if creds.has_section(profile) else {}
    endpoint = o.endpoint
    for where, value in (("AWS_ENDPOINT_URL_S3", env.get("AWS_ENDPOINT_URL_S3")),
                         ("AWS_ENDPOINT_URL", env.get("AWS_ENDPOINT_URL")),
                         (f"endpoint_url of the AWS profile {profile!r}", prof.get("endpoint_url"))):
        if endpoint is None and value:
            endpoint = check_endpoint(value, where)
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

    ``options`` (default: those of :func:`configure_s3`) come below the URI's query. Refused, with
    a message that does not repeat any secret: userinfo (``s3://KEY:SECRET@bucket``), a query key
    other than :data:`QUERY_KEYS` (``?secret_key=…``), a key given twice or without a value, a
    fragment (``#``), an endpoint holding credentials.
    """
    short = shown(uri)
    try:
        parsed = urlsplit(uri)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise InputError(f"{short!r}: not a valid URI; expected s3://bucket/prefix") from None
    if "@" in parsed.netloc:
        raise InputError(f"{short}: {CREDENTIALS_REFUSED}")
    if parsed.fragment or "#" in uri:
        raise InputError(f"{short}: '#' is not supported in an S3 location (everything after it would be "
                         "dropped); expected s3://bucket/prefix")
    bucket = parsed.netloc
    if not bucket:
        raise InputError(f"{short!r}: an S3 location needs a bucket, e.g. s3://bucket/prefix")
    q: dict[str, str] = {}
    for k, v in parse_qsl(parsed.query, keep_blank_values=True):
        norm = k.strip().lower().replace("-", "_")
        if norm in _CREDENTIAL_KEYS or "secret" in norm or "password" in norm or "token" in norm:
            raise InputError(f"{short}: {CREDENTIALS_REFUSED}")
        if k not in QUERY_KEYS:
            raise InputError(f"{short}: unknown S3 setting {_key_shown(k)} in the query; "
                             f"expected {', '.join(QUERY_KEYS)}")
        if k in q:
            raise InputError(f"{short}: the S3 setting {k!r} is given twice in the query")
        if not v.strip():
            raise InputError(f"{short}: the S3 setting {k!r} has no value in the query")
        q[k] = v
    if parsed.query and not q:
        raise InputError(f"{short}: unreadable query (expected key=value settings: {', '.join(QUERY_KEYS)})")
    if "scheme" in q and q["scheme"] not in ("http", "https"):
        raise InputError(f"{short}: scheme must be http or https, got {q['scheme']!r}")
    base = options if options is not None else _configured
    given = base
    if "endpoint_override" in q:
        endpoint = f"{q.get('scheme', 'https')}://{q['endpoint_override']}"
        given = replace(given, endpoint=check_endpoint(endpoint, f"{short}: endpoint_override"))
    if "region" in q:
        given = replace(given, region=q["region"])
    if "profile" in q:
        given = replace(given, profile=q["profile"])
    key = parsed.path.lstrip("/").rstrip("/")
    short = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    return S3Target(bucket, key, short, given.shareable(), resolve(given))


def query_options(uri: str) -> S3Options:
    """The S3 settings an ``s3://`` URI's own query gives (nothing of :func:`configure_s3`)."""
    return parse_s3_uri(uri, S3Options()).given


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
    env = environment.variables()
    return {k: env[k] for k in _ENV_KEYS if k in env and k not in _SECRET_KEYS}
