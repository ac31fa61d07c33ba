"""try_transform and transform against a real etcd."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from etcd_patterns import (
    ConflictError,
    EtcdPatterns,
    KeyNotFoundError,
    NotAValueError,
)
from etcd_patterns.testing import EtcdCluster, ExternalEtcd
from tests.helpers import Raw, run_processes, run_together


def incr(value: str) -> str:
    return str(int(value) + 1)


def test_try_transform_writes_and_returns_the_new_value(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("k", "41")
    assert patterns.try_transform("k", incr) == (True, "42")
    assert raw.value("k") == b"42"


def test_missing_key_without_default(patterns: EtcdPatterns) -> None:
    with pytest.raises(KeyNotFoundError, match="missing"):
        patterns.try_transform("missing", incr)
    with pytest.raises(KeyError):
        patterns.transform("missing", incr)


def test_missing_key_with_default_is_created(patterns: EtcdPatterns, raw: Raw) -> None:
    assert patterns.try_transform("new", incr, default="0") == (True, "1")
    assert patterns.transform("new2", incr, default=b"9") == "10"
    assert raw.value("new") == b"1"
    assert raw.value("new2") == b"10"


def test_a_directory_is_not_a_value(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("d/child", "x")
    revision = raw.revision()
    with pytest.raises(NotAValueError):
        patterns.try_transform("d", incr, default="0")
    with pytest.raises(NotAValueError):
        patterns.transform("d", incr)
    assert raw.revision() == revision


def test_conflict_returns_the_current_value_and_writes_nothing(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    raw.put("k", "1")

    def meddling(value: str) -> str:
        raw.put("k", "from another writer")
        return value + "!"

    assert patterns.try_transform("k", meddling) == (False, "from another writer")
    assert raw.value("k") == b"from another writer"


def test_conflict_on_create(patterns: EtcdPatterns, raw: Raw) -> None:
    def meddling(value: str) -> str:
        raw.put("k", "created meanwhile")
        return value

    assert patterns.try_transform("k", meddling, default="0") == (False, "created meanwhile")


def test_key_turned_into_a_directory_before_create(patterns: EtcdPatterns, raw: Raw) -> None:
    def meddling(value: str) -> str:
        raw.put("k/child", "x")
        return value

    with pytest.raises(NotAValueError):
        patterns.try_transform("k", meddling, default="0")
    assert raw.value("k") is None


def test_key_deleted_before_write(patterns: EtcdPatterns, raw: Raw) -> None:
    def deleting(value: str) -> str:
        raw.client.delete(raw.key("k"))
        return value + "!"

    raw.put("k", "v")
    with pytest.raises(KeyNotFoundError):
        patterns.try_transform("k", deleting)
    raw.put("k", "v")
    assert patterns.try_transform("k", deleting, default="d") == (False, "d")
    assert raw.value("k") is None


def test_transform_reapplies_fn_to_the_winners_value(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("k", "1")
    seen: list[str] = []

    def once_meddling(value: str) -> str:
        seen.append(value)
        if len(seen) == 1:
            raw.put("k", "10")
        return incr(value)

    assert patterns.transform("k", once_meddling) == "11"
    assert seen == ["1", "10"]
    assert raw.value("k") == b"11"


def test_transform_gives_up_with_conflict_error(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("k", "0")
    calls: list[str] = []

    def always_meddling(value: str) -> str:
        calls.append(value)
        raw.put("k", str(len(calls)))
        return "never written"

    with pytest.raises(ConflictError) as info:
        patterns.transform("k", always_meddling, timeout=0.3)
    assert isinstance(info.value, TimeoutError)
    assert len(calls) > 1
    assert raw.value("k") == str(len(calls)).encode()


def test_the_lease_is_preserved(patterns: EtcdPatterns, raw: Raw) -> None:
    lease = raw.grant(60)
    raw.put("k", "1", lease=lease)
    assert patterns.transform("k", incr) == "2"
    assert patterns.try_transform("k", incr) == (True, "3")
    assert raw.get("k").lease == lease
    raw.revoke(lease)
    assert raw.value("k") is None


def test_a_created_key_has_no_lease(patterns: EtcdPatterns, raw: Raw) -> None:
    patterns.transform("k", incr, default="0")
    assert raw.get("k").lease == 0


def test_cost_in_round_trips(
    etcd: EtcdCluster | ExternalEtcd, patterns: EtcdPatterns, raw: Raw
) -> None:
    raw.put("k", "0")
    patterns.transform("k", incr)  # the session lease is granted once, on first use
    with etcd.count_rpcs() as rpcs:
        patterns.try_transform("k", incr)
    assert rpcs.requests == {"etcdserverpb.KV/Txn": 2}
    with etcd.count_rpcs() as rpcs:
        patterns.transform("k", incr)
    assert rpcs.requests == {"etcdserverpb.KV/Txn": 2}

    calls: list[str] = []

    def once_meddling(value: str) -> str:
        calls.append(value)
        if len(calls) == 1:
            raw.put("k", "100")
        return incr(value)

    with etcd.count_rpcs() as rpcs:
        patterns.transform("k", once_meddling)
    # read, losing write, winning write: one more round trip per conflict.
    assert rpcs.requests == {"etcdserverpb.KV/Txn": 3, "etcdserverpb.KV/Put": 1}


def test_threads_sharing_one_instance_count_exactly(patterns: EtcdPatterns, raw: Raw) -> None:
    threads, rounds = 8, 50

    def work() -> None:
        for _ in range(rounds):
            patterns.transform("counter", incr, default="0")

    run_together([work] * threads, timeout=90)
    assert patterns.get_values("counter") == [str(threads * rounds)]


@pytest.mark.timeout(60)
def test_a_writer_in_a_tight_loop_does_not_starve_another(patterns: EtcdPatterns) -> None:
    # Both transform one key without pause. A loser that waited before
    # retrying held a stale value by then, and lost every race, for ever.
    total = 300
    done = [0, 0]
    progress = threading.Condition()
    stop = threading.Event()

    def work(me: int) -> None:
        while not stop.is_set():
            patterns.transform("counter", incr, default="0")
            with progress:
                done[me] += 1
                progress.notify_all()

    workers = [threading.Thread(target=work, args=(me,)) for me in range(2)]
    for worker in workers:
        worker.start()
    try:
        with progress:
            assert progress.wait_for(lambda: sum(done) >= total, timeout=30)
            shares = list(done)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
    # Each wins about half the races; a starved one wins almost none.
    assert min(shares) >= total // 5, shares
    assert patterns.get_values("counter") == [str(sum(done))]


def _process_worker(endpoints: list[str], namespace: str, rounds: int, start: Any) -> None:
    with EtcdPatterns.connect(endpoints, namespace=namespace) as patterns:
        start.wait(timeout=60)
        for _ in range(rounds):
            patterns.transform("counter", incr, default="0")


@pytest.mark.timeout(180)
def test_processes_count_exactly(
    etcd: EtcdCluster | ExternalEtcd, namespace: str, raw: Raw
) -> None:
    processes, rounds = 4, 50
    run_processes(_process_worker, (etcd.endpoints, namespace, rounds), processes)
    assert raw.value("counter") == str(processes * rounds).encode()


def test_fn_result_must_be_str(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("k", "1")
    bad: Callable[[str], Any] = lambda value: int(value) + 1  # noqa: E731
    with pytest.raises(TypeError, match="str"):
        patterns.try_transform("k", bad)
    assert raw.value("k") == b"1"
