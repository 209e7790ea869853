"""The jobs behind the pipelines: the s3 block, publishing version 0, report settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deltagrad_ray.core import InputError, synthetic_classification
from deltagrad_ray.jobs.config import configure, report_target
from deltagrad_ray.store import location, write_dataset

ROOT = Path(__file__).resolve().parents[2]


def test_the_s3_block_travels_with_every_location(monkeypatch):
    from deltagrad_ray.store import s3
    monkeypatch.setattr(s3, "_configured", s3.S3Options())
    configure({"s3": {"endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-3", "profile": None}})
    assert location("s3://bkt/models").portable_uri == \
        "s3://bkt/models?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-3"


@pytest.mark.parametrize("value, expected", [(None, (None, False)), ("r/", ("r/", False)),
                                             ({"output": "r/", "redact_ids": True}, ("r/", True))])
def test_report_settings(value, expected):
    assert report_target(value) == expected


def test_report_settings_are_checked():
    with pytest.raises(InputError, match="config: unknown key report.redact; expected one of output, redact_ids"):
        report_target({"output": "r/", "redact": True})
    with pytest.raises(InputError, match="config: missing required key report.output"):
        report_target({"redact_ids": True})


def test_train_publishes_version_zero_once_and_refuses_before_training(tmp_path):
    write_dataset(synthetic_classification(300, 5, 2, seed=0), tmp_path / "data.parquet")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def train(cache: str):
        cfg = tmp_path / f"{cache}.yaml"
        cfg.write_text(yaml.safe_dump({"data": str(tmp_path / "data.parquet"),
                                       "cache": str(tmp_path / "models" / cache),
                                       "publish": str(tmp_path / "models"), "optimizer": {"steps": 5}}))
        return subprocess.run([sys.executable, "-m", "pipelines.train", "--config", str(cfg)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    p = train("v0")
    assert p.returncode == 0, p.stderr
    p = train("again")
    assert p.returncode == 3 and "version 0 is published already" in p.stderr
    assert not (tmp_path / "models" / "again").exists()   # refused before training
