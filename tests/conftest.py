"""Shared test setup: deterministic torch on 2 cores."""

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _float64_default():
    old = torch.get_default_dtype()
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server over HTTP on 127.0.0.1 (one per test run)."""
    from deltagrad_ray.devservers import start_moto
    server, s3 = start_moto()
    yield s3
    server.stop()


@pytest.fixture(scope="session")
def seaweed_s3():
    """A SeaweedFS server (`weed mini`) on 127.0.0.1 with credentials (one per test run)."""
    from deltagrad_ray.devservers import start_seaweedfs, stop_seaweedfs
    proc, s3, data_dir = start_seaweedfs()
    yield s3
    stop_seaweedfs(proc, data_dir)


@pytest.fixture
def s3_env(monkeypatch):
    """Point the AWS settings of this process at a test server (and back afterwards)."""
    def point(server):
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        from deltagrad_ray.store import s3
        monkeypatch.setattr(s3, "_configured", s3.S3Options())
        return server
    return point
