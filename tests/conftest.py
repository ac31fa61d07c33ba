"""Fixtures shared by every test: a real etcd and a fresh namespace per test.

They stand on the fixtures that etcd-patterns' own pytest plugin gives every
user (`etcd_patterns.pytest_plugin`): the etcd is started once per session,
unless ETCD_ENDPOINTS names a cluster to use instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from etcd_patterns import EtcdPatterns
from etcd_patterns.testing import (
    EtcdCluster,
    ExternalEtcd,
    UnsoundEtcdWarning,
    etcd_version,
    external_from_environment,
    find_etcd_binary,
    is_unsound,
)
from tests.helpers import Raw

pytest_plugins = ["pytester"]


def _binary_version() -> tuple[str, tuple[int, ...] | None]:
    """The harness's etcd binary and its version, if it can tell."""
    # An unsound etcd is said so in the report's header (below), once,
    # rather than raised from whichever test looks for etcd first.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsoundEtcdWarning)
        binary = find_etcd_binary()
    return binary, etcd_version(binary)


def pytest_report_header() -> list[str]:
    external = external_from_environment()
    if external is not None:
        return [f"etcd: ETCD_ENDPOINTS={','.join(external.endpoints)}"]
    binary, version = _binary_version()
    shown = ".".join(map(str, version)) if version else "unknown version"
    lines = [f"etcd: {binary} ({shown})"]
    if is_unsound(version):
        lines.append(
            f"WARNING: etcd {shown} can lose committed writes when a member is killed; "
            "the chaos tests are skipped (scripts/fetch-etcd fetches a sound etcd)"
        )
    return lines


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if external_from_environment() is not None:
        return
    _, version = _binary_version()
    if not is_unsound(version):
        return
    shown = ".".join(map(str, version or ()))
    skip = pytest.mark.skip(
        reason=f"etcd {shown} can lose committed writes when a member is killed"
    )
    for item in items:
        if "chaos" in item.keywords:
            item.add_marker(skip)


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
