"""Endpoints given as IPv6 addresses connect, over a real IPv6 loopback."""

from __future__ import annotations

import socket

import pytest

from etcd_patterns import EtcdPatterns
from etcd_patterns.testing import EtcdCluster


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.timeout(60)
@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
@pytest.mark.parametrize("form", ["[::1]:{port}", "http://[::1]:{port}"])
def test_an_ipv6_endpoint_connects(form: str) -> None:
    with EtcdCluster(client_host="::1") as cluster:
        (endpoint,) = cluster.endpoints
        assert endpoint.startswith("[::1]:")
        port = endpoint.rsplit(":", 1)[1]
        with EtcdPatterns.connect(form.format(port=port), timeout=2, namespace="/v6/") as etcd:
            assert etcd.transform("k", lambda v: v + "x", default="") == "x"
            assert etcd.lock("L", lambda: "locked") == "locked"
            etcd.enqueue("q", "job")
            assert etcd.dequeue("q", timeout=0) == "job"
