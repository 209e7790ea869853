"""The JSON Schema of each job's config (`deltagrad-ray config-schema JOB`): shipped beside the
configs, up to date, accepting every config the project ships and refusing what the job refuses."""

from __future__ import annotations

import json
import pathlib

import jsonschema
import pytest
import yaml

from deltagrad_ray.core import InputError
from deltagrad_ray.jobs import JOBS, config_schema
from deltagrad_ray.jobs.config import check

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _module(job):
    import importlib
    return importlib.import_module(f"deltagrad_ray.jobs.{job}")


@pytest.mark.parametrize("job", JOBS)
def test_the_shipped_schema_is_the_generated_one(job):
    shipped = json.loads((ROOT / "pipelines" / "configs" / "schemas" / f"{job}.schema.json").read_text())
    assert shipped == config_schema(job), f"rerun: deltagrad-ray config-schema {job} > pipelines/configs/schemas/…"
    jsonschema.Draft202012Validator.check_schema(shipped)
    first = (ROOT / "pipelines" / "configs" / f"{job}.yaml").read_text().splitlines()[0]
    assert first == f"# yaml-language-server: $schema=schemas/{job}.schema.json"


@pytest.mark.parametrize("path", sorted([*(ROOT / "pipelines" / "configs").glob("*.yaml"),
                                         *(ROOT / "infra" / "configs").glob("*.yaml")]), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    job = path.stem.replace("_fleet", "")
    raw = yaml.safe_load(path.read_text())
    jsonschema.validate(raw, config_schema(job))
    check(raw, _module(job).SCHEMA)     # and the job's own check agrees


@pytest.mark.parametrize("job,bad", [
    ("jackknife", {"cache": "c", "test": "t", "output": "o", "colour": "blue"}),          # unknown key
    ("jackknife", {"cache": "c", "test": "t"}),                                             # missing required
    ("jackknife", {"cache": None, "test": "t", "output": "o"}),                            # required but null
    ("train", {"data": "x", "cache": "c", "optimizer": {"steps": "many"}}),                 # wrong type
    ("conformal", {"cache": "c", "test": "t", "output": "o", "ray": {"workrs": 2}}),       # unknown nested key
    ("bulk_erasure", {"requests": "r", "models": [{"name": "a", "output": "o", "colur": 1}]}),  # a fleet model's key
    ("bulk_erasure", {"requests": "r", "models": [{"output": "o"}]}),                       # a fleet model's name
])
def test_what_the_job_refuses_the_schema_refuses(job, bad):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, config_schema(job))
    with pytest.raises(InputError):
        cfg = check(bad, _module(job).SCHEMA)
        if job == "bulk_erasure":      # the fleet's models are checked one by one by the job
            for m in cfg["models"]:
                check(m, _module(job).MODEL, "models[]")


def test_the_cli_prints_the_schema(capsys):
    from deltagrad_ray.cli import main
    assert main(["config-schema", "conformal"]) == 0
    assert json.loads(capsys.readouterr().out) == config_schema("conformal")
    with pytest.raises(SystemExit) as e:
        main(["config-schema", "nope"])
    assert e.value.code == 2
