"""What a Ray cluster can hold: refuse at once a replay whose actors can never be placed, and say
whether waiting makes sense (the cluster can grow).

Ray has no public API for an autoscaling cluster's limits; the one read of Ray's private state
(``ray._private.state``, as Ray Train uses it) is here, in :func:`cluster_limits`, and falls back
to a static cluster's view when it is missing or changes shape.
"""

from __future__ import annotations

from typing import NamedTuple

from ..core.errors import InputError
from .session import ray_module


class Limits(NamedTuple):
    """What a cluster can hold: per resource, the largest node (``node_max``) and the total
    (``total``: now, or what autoscaling can reach); ``grows``: whether it can scale up."""

    node_max: dict[str, float]
    total: dict[str, float]
    grows: bool


def cluster_limits() -> Limits:
    """The connected cluster's :class:`Limits`. A static cluster (no autoscaler configuration) can
    hold at most what its nodes have now; an autoscaling one what its node groups can reach (Ray's
    own view of the cluster config, as Ray Train uses it)."""
    ray = ray_module()
    node_max: dict[str, float] = {}
    for n in ray.nodes():
        if n.get("Alive"):
            for k, v in n.get("Resources", {}).items():
                node_max[k] = max(node_max.get(k, 0.0), v)
    total = {k: float(v) for k, v in ray.cluster_resources().items()}
    try:
        from ray._private.state import state as _state
        grow = _state.get_max_resources_from_cluster_config()
        config = _state.get_cluster_config()
        if config is not None:
            for g in config.node_group_configs:
                for k, v in g.resources.items():
                    node_max[k] = max(node_max.get(k, 0.0), float(v))
    except Exception:  # noqa: BLE001 - no autoscaler state (a local or static cluster)
        grow = None
    for k, v in (grow or {}).items():
        total[k] = max(total.get(k, 0.0), float(v))
    return Limits(node_max, total, grow is not None)


def check_fits(groups: list[tuple[int, dict[str, float], str]], detail: str) -> bool:
    """Refuse at once what can never fit (:class:`InputError` naming the resource and the actors
    that need it, ``detail`` appended); True when the cluster can grow (waiting makes sense).

    ``groups``: (count, bundle, what) of the actors to place."""
    limits = cluster_limits()
    need: dict[str, float] = {}
    for count, bundle, what in groups:
        for k, v in bundle.items():
            if v > limits.node_max.get(k, 0.0) + 1e-9:
                raise InputError(f"no node of this cluster can hold one {what} ({k} {v:g}; the largest node "
                                 f"has {limits.node_max.get(k, 0.0):g}){detail}")
            need[k] = need.get(k, 0.0) + count * v
    for k, v in need.items():
        if v > limits.total.get(k, 0.0) + 1e-9:
            parts = " + ".join(f"{c} {what}s × {b.get(k, 0):g} {k}" for c, b, what in groups if b.get(k))
            grows = " at most, autoscaled" if limits.grows else ""
            raise InputError(f"the cluster has {limits.total.get(k, 0.0):g} {k}s{grows}, the replay needs {v:g}: "
                             f"{parts}{detail}")
    return limits.grows


def short_resources(resources: dict) -> str:
    """Resources as ``CPU 2, GPU 1`` (without node markers and memory), for messages."""
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if not k.startswith("node:")
                     and k not in ("memory", "object_store_memory")) or "nothing"
