"""A real S3-compatible HTTP server (`moto_server`) in a separate process, for object-store tests.

One process serves every rank and every spawned upload worker of a test; nothing is patched
in-process. Tests point Composer and Streaming at it with `S3_ENDPOINT_URL` and dummy
credentials (`s3_env`), and make their own buckets.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

DUMMY_CREDENTIALS = {
    'AWS_ACCESS_KEY_ID': 'testing',
    'AWS_SECRET_ACCESS_KEY': 'testing',
    'AWS_DEFAULT_REGION': 'us-east-1',
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_moto_server(port: int, log_path: Path) -> subprocess.Popen:
    """Starts `moto_server` on 127.0.0.1:`port` and waits until it answers HTTP."""
    exe = Path(sys.executable).parent / 'moto_server'
    log = open(log_path, 'ab')  # noqa: SIM115 - lives as long as the server process.
    proc = subprocess.Popen([str(exe), '-H', '127.0.0.1', '-p', str(port)], stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f'http://127.0.0.1:{port}/moto-api/', timeout=1)
            # Ours, not another worker's that took the port first (ours then exits): it says it runs.
            if b'Running on' in log_path.read_bytes() and proc.poll() is None:
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f'moto_server exited early; see {log_path}') from None
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f'moto_server did not answer on port {port} within 30 s; see {log_path}')


@pytest.fixture(scope='session')
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a `moto_server` process shared by the test session."""
    for attempt in range(3):  # a port another process took between `free_port` and the server's bind
        port = free_port()
        try:
            proc = start_moto_server(port, tmp_path_factory.mktemp('moto') / 'moto.log')
            break
        except RuntimeError:
            if attempt == 2:
                raise
    yield f'http://127.0.0.1:{port}'
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """Points this test's process (and its children) at the server; returns `make_bucket()`."""
    import boto3

    monkeypatch.setenv('S3_ENDPOINT_URL', s3_endpoint)
    for key, value in DUMMY_CREDENTIALS.items():
        monkeypatch.setenv(key, value)

    def make_bucket() -> str:
        name = f'test-{uuid.uuid4().hex[:12]}'
        boto3.client('s3', endpoint_url=s3_endpoint).create_bucket(Bucket=name)
        return name

    return make_bucket
