"""Fixtures shared by every test: AWS isolation, moto in process and moto's threaded server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.retries.standard import ExponentialBackoff
from moto import mock_aws
from moto.server import ThreadedMotoServer

from keystate.storage import _s3_client

BUCKET = "keystate-test"


@pytest.fixture(autouse=True)
def _isolated_aws(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test ever reaches real AWS or reads the developer's AWS configuration."""
    nowhere = tmp_path_factory.getbasetemp() / "no-aws-config"
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(nowhere))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def s3_client() -> Iterator[Any]:
    """An S3 client inside moto's in-process ``mock_aws()``, with the test bucket created."""
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's threaded server on 127.0.0.1 (real HTTP), one per test session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def server_bucket(moto_endpoint: str) -> str:
    """A fresh bucket on the moto server; returns its name."""
    name = f"ks-{uuid.uuid4().hex[:20]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_backoffs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays keystate's S3 client computes before its retries, recorded; the sleeps themselves are
    skipped (throttling backoff starts at up to 1 s and doubles: a test of a persistent outage would wait
    a minute). botocore's own standard-mode backoff, which keystate's retry decision overrides for the
    errors it retries, is zeroed too."""
    delays: list[float] = []
    compute = _s3_client.backoff_delay

    def record(attempts: int, throttled: bool) -> float:
        delays.append(compute(attempts, throttled))
        return 0.0

    monkeypatch.setattr(_s3_client, "backoff_delay", record)
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)
    return delays
