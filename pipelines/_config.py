"""Pipeline configs (YAML or JSON) and the shared entry point of every pipeline.

Only this module and the pipelines read configs; everything else is library calls. A config
names URIs, the model and DeltaGrad settings, and a ``ray`` block; unknown keys, missing keys
and wrong types are one-line errors naming the key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable

import yaml

from deltagrad_ray.core.config import DeltaGradConfig
from deltagrad_ray.core.errors import InputError
from deltagrad_ray.store.location import StorageError, location

REQUIRED = object()

# data_shards: null/"auto" (split the features over data actors only when they exceed an actor's
# memory cap) or a count; RayBackend checks the value
RAY = {"address": None, "workers": 2, "num_cpus": 1.0, "num_gpus": 0.0, "mode": "auto", "strategy": "SPREAD",
       "batch_size": 32, "data_shards": None}
# every DeltaGrad setting, with its default (DeltaGradConfig checks the values)
DELTAGRAD = DeltaGradConfig().to_dict()


def _check(value, schema, path: str):
    """``schema``: a dict of sub-schemas, REQUIRED, or a default value whose type is enforced."""
    if isinstance(schema, dict):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise InputError(f"config: {path or 'the file'} must be a mapping, got {type(value).__name__}")
        unknown = sorted(set(value) - set(schema))
        if unknown:
            where = f"{path}.{unknown[0]}" if path else unknown[0]
            raise InputError(f"config: unknown key {where}; expected one of {', '.join(sorted(schema))}")
        out = {}
        for key, sub in schema.items():
            sub_path = f"{path}.{key}" if path else key
            if key in value:
                out[key] = _check(value[key], sub, sub_path)
            elif sub is REQUIRED:
                raise InputError(f"config: missing required key {sub_path}")
            else:
                out[key] = _check({}, sub, sub_path) if isinstance(sub, dict) else sub
        return out
    if schema is REQUIRED:
        if value is None:
            raise InputError(f"config: {path} must be set")
        return value
    if value is None or schema is None:
        return value
    if isinstance(schema, bool):
        ok = isinstance(value, bool)
    elif isinstance(schema, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(schema, str):
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, type(schema))
    if not ok:
        raise InputError(f"config: {path} must be a {type(schema).__name__}, got {value!r}")
    return value


def load(path: str, schema: dict) -> dict:
    """Read and validate a config file; missing optional keys take their defaults."""
    loc = location(path)
    try:
        text = loc.read_text()
    except StorageError as e:
        raise InputError(f"config: cannot read {path} ({e})") from None
    try:
        raw = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0]
        raise InputError(f"config: {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'} ({first})") \
            from None
    return _check(raw, schema, "")


def fanout(ray: dict, deltagrad: dict | None = None, parts: str | None = None):
    """The Fanout a ``ray`` block describes (``address: null`` → a local Ray)."""
    from deltagrad_ray.distributed.backends import RayBackend
    from deltagrad_ray.many import Fanout
    from deltagrad_ray.progress import bar
    address = ray["address"]
    backend = RayBackend(address=address if address not in (None, "local") else None, workers=int(ray["workers"]),
                         mode=ray["mode"], num_cpus=float(ray["num_cpus"]), num_gpus=float(ray["num_gpus"]),
                         strategy=ray["strategy"], device="cuda" if ray["num_gpus"] else "cpu",
                         data_shards="auto" if ray["data_shards"] is None else ray["data_shards"])
    return Fanout(backend=backend, batch_size=int(ray["batch_size"]), config=DeltaGradConfig.from_dict(deltagrad),
                  parts=parts, progress=bar("replays"))


def main(description: str, schema: dict, run: Callable[[dict], dict], argv: list[str] | None = None) -> int:
    """``python -m pipelines.<name> --config FILE``: run, print one JSON summary line, exit 0 /
    1 (bug) / 2 (bad input or config) / 3 (storage)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", required=True, help="YAML or JSON config file")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t0 = time.perf_counter()
    try:
        out = run(load(args.config, schema))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # a bug: say so, with the traceback (jobs keep their logs)
        traceback.print_exc()
        print(f"error: unexpected {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({**out, "seconds": round(time.perf_counter() - t0, 2)}, default=str), flush=True)
    return 0
