"""The S3-compatible object store, through boto3: put, get, exists, delete, list and nothing more.

The state store needs only whole-object operations on chunks of a few MiB, so this stays a thin typed
wrapper; any S3 implementation (AWS, MinIO, SeaweedFS, Ceph RGW) serves it. Credentials live in the
config object with `repr=False` so they never reach a log line.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tartarus.cluster.errors import ClusterUnavailable, ObjectMissing

_MISSING = {"404", "NoSuchKey", "NotFound"}


@dataclass(frozen=True)
class S3Config:
    endpoint: str  # e.g. http://127.0.0.1:8333; path-style addressing, so any host name works
    bucket: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str = "us-east-1"


class ObjectStore:
    """One bucket. boto3 clients are thread-safe, so one instance serves an upload pool."""

    def __init__(self, config: S3Config, *, pool: int = 16) -> None:
        self.config = config
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=config.endpoint,
            aws_access_key_id=config.access_key,
            aws_secret_access_key=config.secret_key,
            region_name=config.region,
            config=Config(
                s3={"addressing_style": "path"},
                max_pool_connections=pool,
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )

    def ensure_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.config.bucket)
        except ClientError as e:
            if _code(e) not in _MISSING:
                raise self._unavailable("check the bucket", e) from e
            self._call("create the bucket", self._client.create_bucket, Bucket=self.config.bucket)
        except BotoCoreError as e:
            raise self._unavailable("check the bucket", e) from e

    def put(self, key: str, data: bytes) -> None:
        self._call(f"put {key}", self._client.put_object, Bucket=self.config.bucket, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        response = self._call(f"get {key}", self._client.get_object, Bucket=self.config.bucket, Key=key)
        body: bytes = response["Body"].read()
        return body

    def delete(self, key: str) -> None:
        """Remove an object (S3 answers a missing one as deleted too)."""
        self._call(f"delete {key}", self._client.delete_object, Bucket=self.config.bucket, Key=key)

    def modified(self, key: str) -> datetime | None:
        """When the object was last written (the store's clock), or None when there is none."""
        try:
            head = self._call(f"check {key}", self._client.head_object, Bucket=self.config.bucket, Key=key)
        except ObjectMissing:
            return None
        at: datetime = head["LastModified"]
        return at

    def listing(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        """Every object under `prefix`: its key and when it was last written."""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.config.bucket, Prefix=prefix
        )
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    yield str(item["Key"]), item["LastModified"]
        except (ClientError, BotoCoreError) as e:
            raise self._unavailable(f"list {prefix}", e) from e

    def exists(self, key: str) -> bool:
        try:
            self._call(f"check {key}", self._client.head_object, Bucket=self.config.bucket, Key=key)
        except ObjectMissing:
            return False
        return True

    def _call(self, what: str, method: Any, **kwargs: Any) -> Any:
        try:
            return method(**kwargs)
        except ClientError as e:
            if _code(e) in _MISSING:
                raise ObjectMissing(f"{what}: no such object in bucket {self.config.bucket}") from e
            raise self._unavailable(what, e) from e
        except BotoCoreError as e:
            raise self._unavailable(what, e) from e

    def _unavailable(self, what: str, e: Exception) -> ClusterUnavailable:
        return ClusterUnavailable(f"object store {self.config.endpoint}: cannot {what}: {e}")


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))
