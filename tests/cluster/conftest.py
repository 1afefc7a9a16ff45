"""Fixtures for the cluster tests: a fresh `cluster` schema on the suite's real PostgreSQL per test; for the
session, the cluster's own network (a test bridge: `roles.ClusterNet`), a PostgreSQL server and a real S3
store (SeaweedFS) listening on its host address, where agents in their network namespaces reach them."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tartarus.bench.services import s3_server
from tartarus.cluster.db import Connection, connect
from tartarus.cluster.objects import ObjectStore, S3Config
from tartarus.cluster.schema import migrate
from tests.cluster.roles import ClusterNet


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
def cluster_net() -> Iterator[ClusterNet]:
    net = ClusterNet()
    try:
        yield net
    finally:
        net.close()


@pytest.fixture(scope="session")
def cluster_server_url(cluster_net: ClusterNet) -> Iterator[str]:
    """A PostgreSQL server on the cluster network's host address (password auth from that network)."""
    from tests.pg import postgres_server

    with postgres_server(listen=cluster_net.host, network=str(cluster_net.subnet)) as url:
        yield url


@pytest.fixture(scope="session")
def s3_config(cluster_net: ClusterNet) -> Iterator[S3Config]:
    with s3_server(host=cluster_net.host) as config:
        yield config


@pytest.fixture
def objects(s3_config: S3Config) -> ObjectStore:
    """A fresh bucket per test on the session's store, so dedup counts start from nothing."""
    store = ObjectStore(
        S3Config(s3_config.endpoint, "t-" + secrets.token_hex(6), s3_config.access_key, s3_config.secret_key)
    )
    store.ensure_bucket()
    return store
