"""When etcd's database is full: clear errors, and reads that still work."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from etcd_patterns import EtcdPatterns, QuotaExceededError
from etcd_patterns.testing import EtcdCluster

QUOTA = 4 * 1024 * 1024
CHUNK = "x" * 1_000_000


@pytest.fixture(scope="module")
def full() -> Iterator[EtcdPatterns]:
    with (
        EtcdCluster(extra_args=[f"--quota-backend-bytes={QUOTA}"]) as cluster,
        EtcdPatterns.connect(cluster.endpoints, namespace="/full/") as etcd,
    ):
        etcd.transform("config", lambda _: "kept", default="")
        etcd.transform("dir/a", lambda _: "1", default="")
        etcd.enqueue("jobs", "queued before")
        with pytest.raises(QuotaExceededError, match="alarm disarm"):
            fill(etcd)
        yield etcd


def fill(etcd: EtcdPatterns) -> None:
    for i in range(64):  # far more than the quota holds
        etcd.transform(f"filler{i}", lambda _: CHUNK, default="")


def test_writes_fail_with_a_clear_error(full: EtcdPatterns) -> None:
    with pytest.raises(QuotaExceededError, match="out of space"):
        full.transform("config", lambda v: v + "!")
    with pytest.raises(QuotaExceededError):
        full.enqueue("jobs", "more")


def test_reads_still_work(full: EtcdPatterns) -> None:
    assert full.get_values("config") == ["kept"]
    assert full.get_values("dir") == ["1"]
    assert full.get_values("jobs") == ["queued before"]
    assert full.get_values("nothing") == []
