"""S3 (and any S3-compatible endpoint) behind :class:`~.location.Location`.

Settings come, in order of precedence, from the URI's query (``?endpoint_override=host:port&
scheme=http&region=…``, pyarrow's own form), from :func:`configure_s3` (the CLI's flags), and
from the standard AWS settings: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the AWS config and credentials files. pyarrow
itself ignores the endpoint variables (FIELD_NOTES); this module is why
``AWS_ENDPOINT_URL=http://127.0.0.1:9000 deltagrad-ray train … --cache s3://bucket/run1`` works.

This is the only module that reads those settings. Credentials are passed to pyarrow and
never printed: :class:`S3Options` hides them from its repr.
"""

from __future__ import annotations

import configparser
import os
import threading
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qs, urlparse

import pyarrow.fs as pafs

from ..core.errors import InputError

_ENV_KEYS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
             "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE",
             "AWS_SHARED_CREDENTIALS_FILE")


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


_configured = S3Options()
_cache: dict[tuple, pafs.S3FileSystem] = {}
_lock = threading.Lock()


def configure_s3(options: S3Options | None = None, **overrides) -> None:
    """Set process-wide S3 options (e.g. from CLI flags); None fields still fall back to the environment."""
    global _configured
    _configured = replace(options or S3Options(), **overrides)


def _aws_file(path_env: str, default: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser()
    path = os.environ.get(path_env) or os.path.expanduser(default)
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
    cfg = _aws_file("AWS_CONFIG_FILE", "~/.aws/config")
    section = "default" if profile == "default" else f"profile {profile}"
    prof = cfg[section] if cfg.has_section(section) else {}
    creds = _aws_file("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    cred = creds[profile] if creds.has_section(profile) else {}
    endpoint = (o.endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
                or prof.get("endpoint_url"))
    region = o.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or prof.get("region")
    access = o.access_key or env.get("AWS_ACCESS_KEY_ID") or cred.get("aws_access_key_id")
    secret = o.secret_key or env.get("AWS_SECRET_ACCESS_KEY") or cred.get("aws_secret_access_key")
    token = o.session_token or env.get("AWS_SESSION_TOKEN") or cred.get("aws_session_token")
    return replace(o, endpoint=endpoint, region=region, access_key=access, secret_key=secret,
                   session_token=token, profile=None if profile == "default" else profile)


def _filesystem(o: S3Options) -> pafs.S3FileSystem:
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


def s3_location(uri: str, options: S3Options | None = None):
    """The :class:`~.location.Location` of ``s3://bucket/prefix[?endpoint_override=…&scheme=…]``."""
    from .location import Location

    parsed = urlparse(uri)
    bucket = parsed.netloc
    if not bucket:
        raise InputError(f"{uri!r}: an S3 location needs a bucket, e.g. s3://bucket/prefix")
    o = resolve(options)
    q = parse_qs(parsed.query)
    if "endpoint_override" in q:
        scheme = q.get("scheme", ["https"])[0]
        o = replace(o, endpoint=f"{scheme}://{q['endpoint_override'][0]}")
    if "region" in q:
        o = replace(o, region=q["region"][0])
    key = parsed.path.lstrip("/").rstrip("/")
    shown = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    endpoint = o.endpoint or f"AWS S3 ({o.region or 'us-east-1'})"
    return Location(_filesystem(o), f"{bucket}/{key}" if key else bucket, shown, endpoint)


_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def environment_for_workers() -> dict[str, str]:
    """The non-secret AWS settings of this process (endpoint, region, profile, config paths), to
    pass to remote workers (a Ray runtime_env). Credentials are never passed this way — a
    runtime_env is shown in job details — workers get them from their own environment (instance
    profile, Kubernetes secret, or the local processes they inherit it from)."""
    return {k: os.environ[k] for k in _ENV_KEYS if k in os.environ and k not in _SECRET_KEYS}
