"""What the S3 servers of the tests (``seaweed.py``, ``ceph.py``) share: the
one identity both are set up with, a client for it, and port probing."""

from __future__ import annotations

import secrets
import socket
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ACCESS_KEY = "nixery-test"
SECRET_KEY = "nixery-test-secret"
#: Any region signs for Ceph's default zonegroup; us-east-1 also keeps boto3
#: from sending a LocationConstraint, which Ceph would check against "default".
REGION = "us-east-1"


def client(endpoint: str) -> S3Client:
    """A boto3 client of the test identity, by path-style URLs."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    )


def new_bucket(endpoint: str) -> str:
    """A new, empty bucket on the server at ``endpoint``; its name."""
    name = "test-" + secrets.token_hex(6)
    client(endpoint).create_bucket(Bucket=name)
    return name


def answers(endpoint: str, status: int) -> bool:
    """Whether an unsigned GET / of the server gets ``status`` (it is up)."""
    try:
        return httpx.get(endpoint, timeout=1).status_code == status
    except httpx.TransportError:
        return False


def port_free(port: int) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 now."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
