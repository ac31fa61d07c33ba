"""Fixtures shared by every test: a real etcd and a fresh namespace per test.

The etcd is started once per session by `etcd_patterns.testing`, unless
ETCD_ENDPOINTS names a cluster to use instead.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from etcd_patterns import EtcdPatterns
from etcd_patterns.testing import (
    EtcdCluster,
    ExternalEtcd,
    external_from_environment,
    find_etcd_binary,
)
from tests.helpers import Raw


def pytest_report_header() -> str:
    external = external_from_environment()
    if external is not None:
        return f"etcd: ETCD_ENDPOINTS={','.join(external.endpoints)}"
    binary = find_etcd_binary()
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.splitlines()[:1]
    return f"etcd: {binary} ({''.join(version)})"


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdCluster | ExternalEtcd]:
    """The etcd every test shares: external if ETCD_ENDPOINTS is set."""
    external = external_from_environment()
    if external is not None:
        yield external
        return
    with EtcdCluster(size=1) as cluster:
        yield cluster


@pytest.fixture
def local_etcd(etcd: EtcdCluster | ExternalEtcd) -> EtcdCluster:
    """The shared etcd, for tests that need to signal its processes."""
    if not isinstance(etcd, EtcdCluster):
        pytest.skip("needs an etcd started by the harness, not ETCD_ENDPOINTS")
    return etcd


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    """A key prefix no other test uses."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:60]
    return f"/tests/{name}/{uuid.uuid4().hex[:8]}/"


@pytest.fixture
def patterns(etcd: EtcdCluster | ExternalEtcd, namespace: str) -> Iterator[EtcdPatterns]:
    """A connected instance confined to this test's namespace."""
    with EtcdPatterns.connect(etcd.endpoints, namespace=namespace) as instance:
        yield instance


@pytest.fixture
def other(etcd: EtcdCluster | ExternalEtcd, namespace: str) -> Iterator[EtcdPatterns]:
    """A second instance in the same namespace, as another process would have."""
    with EtcdPatterns.connect(etcd.endpoints, namespace=namespace) as instance:
        yield instance


@pytest.fixture
def raw(etcd: EtcdCluster | ExternalEtcd, namespace: str) -> Iterator[Raw]:
    """Direct etcd access inside this test's namespace, bypassing the library."""
    with Raw(etcd.endpoints, namespace) as client:
        yield client
