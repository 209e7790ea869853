"""Shared test setup: deterministic torch on 2 cores."""

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# nothing of the caller's environment decides what the tests touch: no cluster to join, no S3
# endpoint, profile or credentials of theirs, no fault hook or debug switch of this project (the
# tests set what they need, for themselves and for the processes they start)
for _name in list(os.environ):
    if _name.startswith(("AWS_", "DELTAGRAD_")) or _name in ("RAY_ADDRESS", "RAY_NAMESPACE"):
        del os.environ[_name]
# ... nor their AWS config and credentials files (boto3, pyarrow and this project read them)
os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
# every Ray process on loopback. Ray reads this when it is first imported (ray_constants), which
# can happen at collection (tests/infra imports ray): set before any test module loads. Without it
# Ray advertises the machine's interface address while its GCS listens on 127.0.0.1, and nodes
# added on 127.0.0.1 look like another host.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# token authentication (Ray reads the mode at import too)
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or os.path.exists(os.path.expanduser("~/.ray/auth_token"))):
    # ray.init generates ~/.ray/auth_token, the cluster utility does not: on a fresh machine its
    # GCS dies for want of a token. A token for this test run only, inherited by every subprocess
    # (CLI, job submission), never written to disk.
    import secrets
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


@pytest.fixture(autouse=True)
def _float64_default():
    old = torch.get_default_dtype()
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server over HTTP on 127.0.0.1 (one per test run)."""
    from tests.servers import start_moto
    server, s3 = start_moto()
    yield s3
    server.stop()


@pytest.fixture(scope="session")
def seaweed_s3():
    """A SeaweedFS server (`weed mini`) on 127.0.0.1 with credentials (one per test run)."""
    from tests.servers import start_seaweedfs, stop_seaweedfs
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


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the whole test run: a head and two worker nodes on this machine, each
    with one unit of a custom resource standing in for a GPU, the dashboard on 127.0.0.1 (for
    job submission). Connected once; every Ray test shares it."""
    import socket

    import ray
    from ray.cluster_utils import Cluster

    from tests.servers import KEY, SECRET

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    # the cluster's processes inherit this environment: credentials for the test S3 servers (any
    # key works with moto), but no endpoint — S3 settings reach actors with the locations
    os.environ.setdefault("AWS_ACCESS_KEY_ID", KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", SECRET)
    endpoints = {k: os.environ.pop(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3") if k in os.environ}
    try:
        # free ports for the dashboard and the head's dashboard agent (job submission): their
        # defaults (8265, 52365) are taken when another Ray runs on this machine
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": 2, "resources": {"accel": 1}, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()})
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={"accel": 1})
        cluster.wait_for_nodes()
    finally:
        os.environ.update(endpoints)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    import gc
    import warnings
    ray.shutdown()
    with warnings.catch_warnings():
        # Ray's cluster utility drops Popen handles of processes it has just killed; collect them
        # here rather than let "subprocess still running" surface in an unrelated later test
        warnings.simplefilter("ignore", ResourceWarning)
        cluster.shutdown()
        gc.collect()
