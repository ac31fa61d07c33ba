"""User and password authentication, with a role confined to a key prefix."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from etcd_patterns import EtcdPatterns, PermissionDeniedError
from etcd_patterns.testing import EtcdCluster, find_etcd_binary


@pytest.fixture(scope="module")
def secured() -> Iterator[EtcdCluster]:
    with EtcdCluster() as cluster:
        etcdctl = [find_etcd_binary("etcdctl"), f"--endpoints={cluster.endpoints[0]}"]
        for command in (
            ["user", "add", "root:rootpw"],
            ["user", "add", "app:apppw"],
            ["role", "add", "app"],
            ["role", "grant-permission", "app", "--prefix=true", "readwrite", "/app/"],
            ["user", "grant-role", "app", "app"],
            ["auth", "enable"],
        ):
            subprocess.run([*etcdctl, *command], check=True, capture_output=True, timeout=30)
        yield cluster


def test_a_user_confined_to_a_prefix_works_inside_it(secured: EtcdCluster) -> None:
    with EtcdPatterns.connect(
        secured.endpoints, user="app", password="apppw", namespace="/app/"
    ) as etcd:
        assert etcd.transform("k", lambda v: v + "x", default="") == "x"
        assert etcd.get_values("k") == ["x"]


def test_outside_its_prefix_it_is_denied(secured: EtcdCluster) -> None:
    with EtcdPatterns.connect(
        secured.endpoints, user="app", password="apppw", namespace="/other/"
    ) as etcd:
        with pytest.raises(PermissionDeniedError, match="permission denied"):
            etcd.get_values("k")
        with pytest.raises(PermissionDeniedError):
            etcd.transform("k", lambda v: v, default="")


def test_a_wrong_password_is_refused_at_connect(secured: EtcdCluster) -> None:
    with pytest.raises(PermissionDeniedError, match="authentication failed"):
        EtcdPatterns.connect(secured.endpoints, user="app", password="wrong")
