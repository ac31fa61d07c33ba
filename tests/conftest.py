"""Fixtures shared by every test: a real etcd and a fresh namespace per test.

They stand on the fixtures that etcd-patterns' own pytest plugin gives every
user (`etcd_patterns.pytest_plugin`): the etcd is started once per session,
unless ETCD_ENDPOINTS names a cluster to use instead.
"""

from __future__ import annotations

import subprocess
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

pytest_plugins = ["pytester"]


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
def etcd(etcd_server: EtcdCluster | ExternalEtcd) -> EtcdCluster | ExternalEtcd:
    """The etcd every test shares: the plugin's, external if ETCD_ENDPOINTS is set."""
    return etcd_server


@pytest.fixture
def namespace(etcd_namespace: str) -> str:
    """A key prefix no other test uses."""
    return etcd_namespace


@pytest.fixture
def patterns(etcd_patterns: EtcdPatterns) -> EtcdPatterns:
    """A connected instance confined to this test's namespace."""
    return etcd_patterns


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
