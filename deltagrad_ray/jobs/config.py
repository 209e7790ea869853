"""Job configs (YAML or JSON, or dicts built in code) and the shared entry point of every job.

A config names URIs, the model and DeltaGrad settings, a ``ray`` block and an optional ``s3``
block; unknown keys, missing keys and wrong types are one-line errors naming the key.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence

import yaml

from .. import environment
from ..core.config import DeltaGradConfig
from ..core.errors import InputError
from ..runtime import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL
from ..store.location import StorageError, location

REQUIRED = object()


class PartialRun(Exception):
    """A job that did part of its work (a fleet where some models failed): its result line is
    printed, then the one-line reason, and it exits 4."""

    def __init__(self, summary: dict, message: str) -> None:
        super().__init__(message)
        self.summary = summary

# data_shards: null/"auto" (split the features over data actors only when they exceed an actor's
# memory cap) or a count; RayBackend checks the value
RAY = {"address": None, "workers": 2, "num_cpus": 1.0, "num_gpus": 0.0, "mode": "auto", "strategy": "SPREAD",
       "batch_size": 32, "data_shards": None}
def local_ray(batch_size: int) -> dict:
    """The ``ray`` block of the local defaults: a local Ray (address null), two single-CPU workers."""
    return {"address": None, "workers": 2, "num_cpus": 1, "num_gpus": 0, "mode": "auto", "strategy": "SPREAD",
            "batch_size": batch_size}


# every DeltaGrad setting, with its default (DeltaGradConfig checks the values)
DELTAGRAD = DeltaGradConfig().to_dict()
# S3 settings for every s3:// location of the job (non-secret; credentials stay in the environment)
S3 = {"endpoint_url": None, "region": None, "profile": None}


def check(value, schema, path: str = ""):
    """``value`` validated against ``schema`` (a dict of sub-schemas, REQUIRED, or a default value
    whose type is enforced); missing optional keys take their defaults."""
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
                out[key] = check(value[key], sub, sub_path)
            elif sub is REQUIRED:
                raise InputError(f"config: missing required key {sub_path}")
            else:
                out[key] = check({}, sub, sub_path) if isinstance(sub, dict) else sub
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


def json_schema(schema: dict, title: str, arrays: dict | None = None) -> dict:
    """The JSON Schema (draft 2020-12) of what :func:`check` accepts for ``schema``, for editors that
    validate YAML (``deltagrad-ray config-schema JOB``; a ``# yaml-language-server: $schema=…`` line).

    Mappings allow only their keys (unknown keys are refused, as by :func:`check`) and may be null
    (taken as empty); REQUIRED keys must be present and not null; a default's type is enforced
    (numbers: ints and floats alike; the job checks ranges) and null always means the default; a
    None default takes any value (the job checks it), except the keys in ``arrays``: lists of
    mappings of the schema given there (e.g. a fleet's ``models``)."""
    arrays = arrays or {}

    def node(sub, key: str | None = None) -> dict:
        if key in arrays:
            return {"type": ["array", "null"], "items": {**node(arrays[key]), "type": "object"}, "default": None}
        if isinstance(sub, dict):
            return {"type": ["object", "null"], "additionalProperties": False,
                    "properties": {k: node(v, k) for k, v in sub.items()},
                    **({"required": req} if (req := [k for k, v in sub.items() if v is REQUIRED]) else {})}
        if sub is REQUIRED:
            return {"not": {"type": "null"}}
        if sub is None:
            return {"default": None}
        kind = ("boolean" if isinstance(sub, bool) else "number" if isinstance(sub, (int, float))
                else "string" if isinstance(sub, str) else "array" if isinstance(sub, (list, tuple)) else None)
        if kind is None:
            return {"default": sub}
        default = list(sub) if isinstance(sub, tuple) else sub
        return {"type": [kind, "null"], "default": default}
    top = node(schema)
    top["type"] = "object"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title, **top}


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
    return check(raw, schema, "")


def merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied (mappings merged key by key, one level deep)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = {**(out.get(key) or {}), **value} if isinstance(value, dict) else value
    return out


def configure(cfg: dict) -> None:
    """Apply the config's ``s3`` block to this process (the settings then travel with every location)."""
    block = cfg.get("s3") or {}
    if any(block.get(k) for k in S3):
        from ..store.s3 import configure_s3
        configure_s3(endpoint=block.get("endpoint_url"), region=block.get("region"), profile=block.get("profile"))


def report_target(value) -> tuple[str | None, bool]:
    """A config's ``report``: a location (``reports/``), or ``{output: LOCATION, redact_ids: bool}``.

    Returns:
      (location or None, redact_ids).
    """
    if value is None or isinstance(value, str):
        return value, False
    out = check(value, {"output": REQUIRED, "redact_ids": False}, "report")
    if not isinstance(out["output"], str):
        raise InputError(f"config: report.output must be a str, got {out['output']!r}")
    return out["output"], bool(out["redact_ids"])


def fanout(ray: dict, deltagrad: dict | None = None, parts: str | None = None):
    """The Fanout a ``ray`` block describes (``address: null`` → a local Ray). The values go to
    :class:`~deltagrad_ray.distributed.backends.RayBackend` and :class:`~deltagrad_ray.many.Fanout`
    as written (they check them: ``workers: 2.5`` or ``num_cpus: .nan`` is an input error, exit 2);
    an ``address`` where nothing answers fails after
    :data:`~deltagrad_ray.distributed.session.CONNECT_TIMEOUT_S` seconds (a storage error, exit 3)."""
    from ..distributed.backends import RayBackend
    from ..many import Fanout
    from ..progress import bar
    address = ray["address"]
    backend = RayBackend(address=address if address not in (None, "local") else None, workers=ray["workers"],
                         mode=ray["mode"], num_cpus=ray["num_cpus"], num_gpus=ray["num_gpus"],
                         strategy=ray["strategy"], device="cuda" if ray["num_gpus"] else "cpu",
                         data_shards="auto" if ray["data_shards"] is None else ray["data_shards"])
    return Fanout(backend=backend, batch_size=ray["batch_size"], config=DeltaGradConfig.from_dict(deltagrad),
                  parts=parts, progress=bar("replays"))


def fanout_job(cfg: dict, parts: str):
    """What a fan-out job (jackknife, conformal) starts from: its cache (a models prefix gives its
    published version), its output location, and the :func:`fanout` of its ``ray`` block keeping
    results incrementally under ``output/parts``.

    Returns:
      (cache, output location, Fanout).
    """
    from ..store import location
    from ..store.registry import open_resolved
    out = location(cfg["output"])
    return open_resolved(cfg["cache"]), out, fanout(cfg["ray"], parts=out.join(parts).uri)


def main(description: str, schema: dict, run: Callable[[dict], dict], argv: list[str] | None = None,
         options: Sequence[tuple[str, str, type, str]] = ()) -> int:
    """``python -m pipelines.<name> --config FILE``: run, print one JSON summary line, exit 0 /
    1 (bug) / 2 (bad input or config) / 3 (storage) / 130 (interrupted: Ctrl-C or SIGTERM).

    ``options``: extra flags ``(flag, config path "a.b", type, help)`` that override the config.

    Called without ``argv`` (a pipeline's entry point) it ends the process itself with the code
    (:func:`deltagrad_ray.runtime.end`: Ray shut down, output flushed, no interpreter teardown, which
    could abort the process with exit 134); with ``argv`` it returns the code.
    """
    if argv is not None:
        return _main(description, schema, run, argv, options)
    from ..runtime import run_to_end
    run_to_end(lambda: _main(description, schema, run, None, options))


def _main(description: str, schema: dict, run: Callable[[dict], dict], argv: list[str] | None,
          options: Sequence[tuple[str, str, type, str]]) -> int:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", required=True, help="YAML or JSON config file")
    for flag, _, kind, helptext in options:
        ap.add_argument(flag, type=kind, default=None, help=helptext)
    args = ap.parse_args(argv)
    environment.set_default("OMP_WAIT_POLICY", "PASSIVE")
    t0 = time.perf_counter()
    try:
        cfg = load(args.config, schema)
        for flag, path, _, _ in options:
            value = getattr(args, flag.lstrip("-").replace("-", "_"))
            if value is not None:
                *keys, last = path.split(".")
                block = cfg
                for k in keys:
                    block = block[k]
                block[last] = value
        configure(cfg)
        out = run(cfg)
    except PartialRun as e:
        print(json.dumps({**e.summary, "seconds": round(time.perf_counter() - t0, 2)}, default=str), flush=True)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PARTIAL
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as raised:  # noqa: BLE001 - every failure ends with its documented code
        from ..runtime import report_failure
        return report_failure(raised, show_traceback=True)   # jobs keep their logs: a bug's traceback always
    print(json.dumps({**out, "seconds": round(time.perf_counter() - t0, 2)}, default=str), flush=True)
    return EXIT_OK
