"""Fixtures for the cluster tests: a fresh `cluster` schema on the suite's real PostgreSQL per test, and a
real S3 store (SeaweedFS on loopback) for the session."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tartarus.bench.services import s3_server
from tartarus.cluster.db import Connection, connect
from tartarus.cluster.objects import ObjectStore, S3Config
from tartarus.cluster.schema import migrate


@pytest.fixture
def cluster_url(postgres_server_url: str) -> str:
    """An empty database with the cluster schema migrated."""
    from tests.pg import fresh_database

    url = fresh_database(postgres_server_url, "c_" + secrets.token_hex(6))
    with connect(url) as conn:
        migrate(conn)
    return url


@pytest.fixture
def conn(cluster_url: str) -> Iterator[Connection]:
    with connect(cluster_url) as c:
        yield c


@pytest.fixture(scope="session")
def s3_config() -> Iterator[S3Config]:
    with s3_server() as config:
        yield config


@pytest.fixture
def objects(s3_config: S3Config) -> ObjectStore:
    """A fresh bucket per test on the session's store, so dedup counts start from nothing."""
    store = ObjectStore(
        S3Config(s3_config.endpoint, "t-" + secrets.token_hex(6), s3_config.access_key, s3_config.secret_key)
    )
    store.ensure_bucket()
    return store
