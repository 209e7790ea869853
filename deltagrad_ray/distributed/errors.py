"""Errors raised inside Ray tasks and actors, as the caller would have seen them in process.

Ray hands a remote failure back wrapped: a ``RayTaskError`` (whose text is the remote traceback)
around the exception raised, also when an actor's constructor failed. :func:`local_error` takes
the wrapping off, so the command line and the jobs report an :class:`~deltagrad_ray.core.errors.InputError`
or a :class:`~deltagrad_ray.store.location.StorageError` raised on a worker with the same one-line
message and exit code as one raised in process (the project's errors pickle with their type:
:class:`~deltagrad_ray.core.errors.Portable`).
"""

from __future__ import annotations

import sys


def local_error(e: BaseException) -> BaseException:
    """The exception a Ray task or actor raised, unwrapped from Ray's ``RayTaskError`` (nested ones
    too); ``e`` itself when it is no Ray wrapper or carries no exception.

    Args:
      e: an exception caught on the driver.

    Returns:
      The innermost exception raised by user code.

    >>> local_error(ValueError("x")).args
    ('x',)
    """
    ray = sys.modules.get("ray")  # Ray's errors exist only where Ray was imported
    if ray is None:
        return e
    for _ in range(16):  # a task that called a task: wrappers nest
        cause = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
        if not isinstance(cause, BaseException) or cause is e:
            break
        e = cause
    return e


def remote_traceback(e: BaseException) -> str | None:
    """The traceback a Ray task reported with ``e`` (for ``--debug``), if any."""
    ray = sys.modules.get("ray")
    if ray is None or not isinstance(e, ray.exceptions.RayTaskError):
        return None
    return getattr(e, "traceback_str", None)


def keeps_init_error(cls: type) -> type:
    """``cls`` for use as a Ray actor class whose construction errors reach the driver with their type.

    Ray reports an actor whose constructor raised only as text (``ActorDiedError``, the remote
    traceback in its message). The class returned keeps an
    :class:`~deltagrad_ray.core.errors.InputError` or
    :class:`~deltagrad_ray.store.location.StorageError` raised while constructing, and every public
    method raises it: the driver's first call gets it as a task error, which :func:`local_error`
    unwraps. Any other error of the constructor kills the actor as before (Ray's restarts apply).
    """
    import functools

    from ..core.errors import InputError
    from ..store.location import StorageError

    def __init__(self, *args, **kwargs) -> None:
        self._init_error = None
        try:
            cls.__init__(self, *args, **kwargs)
        except (InputError, StorageError) as e:
            self._init_error = local_error(e)

    namespace = {"__init__": __init__, "__doc__": cls.__doc__, "__module__": cls.__module__,
                 "__qualname__": cls.__qualname__}
    for name, fn in vars(cls).items():
        if name.startswith("_") or not callable(fn):
            continue

        def method(self, *args, _fn=fn, **kwargs):
            if self._init_error is not None:
                raise self._init_error
            return _fn(self, *args, **kwargs)
        namespace[name] = functools.wraps(fn)(method)
    return type(cls.__name__, (cls,), namespace)
