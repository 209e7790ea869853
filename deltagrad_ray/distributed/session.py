"""The Ray session: connect to a cluster (or start a local Ray of this process's own) with a
bounded wait, ``ray.get`` that raises the project's errors as themselves, and which errors are
the cluster's own (retried within a budget) rather than the replay's.
"""

from __future__ import annotations

import math
import sys
import time


from .. import environment
from ..core.errors import InputError
from ..store.location import StorageError
from .errors import local_error


def ray_module():
    import ray
    return ray


CONNECT_TIMEOUT_S = 30.0  # how long ensure_ray waits for a Ray address to answer (Ray's own retries: minutes)


def address_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for a Ray address ``HOST:PORT``, ``HOST`` (port 6379) or ``ray://HOST:PORT``
    (port 10001); None for ``auto`` and ``local``, which Ray resolves on this machine."""
    from ..store.s3 import shown
    if address in ("auto", "local"):
        return None
    text = address.strip()
    expected = "expected HOST:PORT (the head's GCS, port 6379 by default) or ray://HOST:PORT (Ray Client, 10001)"
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    if scheme in ("http", "https"):
        raise InputError(f"Ray address {shown(text)!r} is an HTTP address (the dashboard or job API), not a "
                         f"cluster's; {expected}")
    if scheme not in ("", "ray"):
        raise InputError(f"Ray address {shown(text)!r}: unknown scheme {scheme!r}; {expected}")
    if "@" in rest or "?" in rest or "#" in rest or "/" in rest.rstrip("/") or not rest.strip("/"):
        raise InputError(f"Ray address {shown(text)!r}: {expected}")
    rest = rest.rstrip("/")
    default = 10001 if scheme == "ray" else 6379
    if rest.startswith("["):  # [IPv6]:port
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host, port = rest, ""
    if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise InputError(f"Ray address {shown(text)!r}: {expected}")
    return host, int(port) if port else default


def check_ray_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`~deltagrad_ray.store.location.StorageError` unless something at ``address``
    accepts a connection and answers gRPC (as a Ray GCS or Ray Client server does) within
    ``timeout_s`` seconds; :class:`InputError` for an address that cannot be one. ``ray.init``
    itself retries an unreachable address for many minutes."""
    import socket

    from ..store.s3 import shown
    endpoint = address_endpoint(address)
    if endpoint is None:
        return
    host, port = endpoint
    deadline = time.monotonic() + timeout_s
    hint = "check --address (or RAY_ADDRESS) and that the cluster is up"
    while True:  # 1. something accepts connections (a head that is starting may take a few seconds)
        try:
            with socket.create_connection((host, port), timeout=max(0.05, min(5.0, deadline - time.monotonic()))):
                break
        except OSError as e:
            why = e.strerror or str(e) or type(e).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            raise StorageError(f"Ray cluster at {shown(address)}: cannot connect ({why}) within {timeout_s:g} s; "
                               f"{hint}")
        time.sleep(min(0.5, left))
    try:  # 2. it speaks gRPC: a port that accepts and never answers would keep ray.init waiting
        import grpc
        try:
            from ray._private.grpc_utils import init_grpc_channel  # TLS and token settings as Ray uses them
            channel = init_grpc_channel(f"{host}:{port}")
        except Exception:  # noqa: BLE001 - an older or newer Ray: a plain channel
            channel = grpc.insecure_channel(f"{host}:{port}")
    except ImportError:  # no grpc: the connection above is all we can check
        return
    try:
        grpc.channel_ready_future(channel).result(timeout=max(0.05, deadline - time.monotonic()))
    except grpc.FutureTimeoutError:
        raise StorageError(f"Ray cluster at {shown(address)}: {host}:{port} accepts connections but does not answer "
                           f"as a Ray cluster within {timeout_s:g} s; is it the head's GCS port (6379 by default) or "
                           f"the Ray Client port (ray://…:10001)? {hint}") from None
    finally:
        channel.close()


def ensure_ray(address: str | None = None, *, connect_timeout_s: float = CONNECT_TIMEOUT_S, **init_kwargs) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray of this process's own, unless
    already connected. A local Ray listens on loopback only, and never joins another Ray found on
    the machine (``ray.init()`` without an address would).

    An address where nothing answers fails within ``connect_timeout_s`` seconds (default 30) with
    a :class:`~deltagrad_ray.store.location.StorageError` (:func:`check_ray_address`), instead of
    Ray's own retries (minutes).
    """
    if not (isinstance(connect_timeout_s, (int, float)) and not isinstance(connect_timeout_s, bool)
            and math.isfinite(connect_timeout_s) and connect_timeout_s > 0):
        raise InputError(f"connect_timeout_s must be a number of seconds > 0, got {connect_timeout_s!r}")
    address = address or environment.ray_address()
    if not address:  # Ray reads this when first imported: set it before
        environment.set_default("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = ray_module()
    if ray.is_initialized():
        return
    if address:
        check_ray_address(address, connect_timeout_s)
    from ..store.s3 import environment_for_workers
    env = {"env_vars": environment_for_workers()} if environment_for_workers() else None
    kwargs = {"include_dashboard": False, "log_to_driver": False, **init_kwargs}
    if env:
        kwargs["runtime_env"] = env
    if address:
        kwargs.pop("num_cpus", None)
        ray.init(address=address, **kwargs)
    else:  # on loopback even if Ray was imported before the setting above
        ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)


def get(refs):
    """``ray.get``; the project's errors raised on a worker (or while building an actor) are raised
    as themselves: their type and one-line message, as in process."""
    ray = ray_module()
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = local_error(e)
        if isinstance(cause, (InputError, StorageError)):
            raise cause from None
        raise


def notice(message: str) -> None:
    print(f"deltagrad-ray: {message}", file=sys.stderr, flush=True)


def cluster_failure_types() -> tuple[type[BaseException], ...]:
    """Errors of the cluster itself (not of the replay): retried within the budget."""
    ex = ray_module().exceptions
    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ObjectLostError", "OwnerDiedError",
             "ObjectFetchTimedOutError", "ObjectReconstructionFailedError", "NodeDiedError", "WorkerCrashedError",
             "RaySystemError", "LocalRayletDiedError", "TaskUnschedulableError", "ActorUnschedulableError")
    return tuple(getattr(ex, n) for n in names if hasattr(ex, n))
