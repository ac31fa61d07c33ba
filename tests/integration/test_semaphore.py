"""Semaphores against a real etcd: the limit, its record, order, wake-ups, crashes, cost."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from contextlib import ExitStack
from typing import Any

import pytest

from etcd_patterns import (
    EtcdPatterns,
    LockLostError,
    NotALockError,
    Permit,
    SemaphoreLimitError,
    SemaphoreTimeoutError,
)
from etcd_patterns.testing import EtcdCluster, ExternalEtcd
from tests.helpers import (
    SCHEDULING_GRACE,
    Raw,
    freed_within,
    holder_to_kill,
    run_processes,
    wait_until,
    watchers,
)

Etcd = EtcdCluster | ExternalEtcd


def queued(raw: Raw, name: str = "S") -> int:
    return raw.count(f"{name}/")


def test_limit_holders_at_once_and_the_record_goes_with_the_last(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    with patterns.semaphore("S", 2) as first, patterns.semaphore("S", 2) as second:
        assert (first.limit, second.limit) == (2, 2)
        assert first.fencing_token < second.fencing_token
        assert raw.value("S") == b"semaphore limit=2"  # the recorded limit
        assert first.is_owner()
        with pytest.raises(SemaphoreTimeoutError):
            patterns.semaphore("S", 2, timeout=0.2).__enter__()
        assert queued(raw) == 2  # the waiter that gave up left nothing
    assert queued(raw) == 0
    assert raw.value("S") is None  # deleted by the last holder to leave


def test_a_different_limit_is_refused_and_writes_nothing(
    patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    with patterns.semaphore("S", 3):
        before = raw.revision()
        with pytest.raises(SemaphoreLimitError) as refused:
            other.semaphore("S", 4).__enter__()
        assert refused.value.recorded == 3
        assert raw.revision() == before
    with other.semaphore("S", 4):  # nobody holds: a new limit is fine
        assert raw.value("S") == b"semaphore limit=4"


def test_a_limit_left_by_crashed_holders_is_overwritten(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("S", "semaphore limit=5")  # recorded by holders that are all gone
    with patterns.semaphore("S", 2):
        assert raw.value("S") == b"semaphore limit=2"


@pytest.mark.parametrize("data", ["not a limit", "5"])
def test_a_name_that_holds_data_is_refused(patterns: EtcdPatterns, raw: Raw, data: str) -> None:
    raw.put("S", data)
    before = raw.revision()
    with pytest.raises(NotALockError):
        patterns.semaphore("S", 2).__enter__()
    assert raw.revision() == before
    assert raw.value("S") == data.encode()


def test_waiters_get_permits_in_arrival_order(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    # Two holders, then waiters A, B, C in that order. Each time a permit is
    # given back, the oldest waiter, and only it, gets it.
    names = "ABC"
    got = {name: threading.Event() for name in names}
    leave = {name: threading.Event() for name in names}

    def wait_for_permit(instance: EtcdPatterns, name: str) -> None:
        with instance.semaphore("S", 2, timeout=30):
            got[name].set()
            leave[name].wait(timeout=30)

    waiting = []
    first, second = patterns.semaphore("S", 2), patterns.semaphore("S", 2)
    first.__enter__()
    second.__enter__()
    for name in names:
        instance = EtcdPatterns.connect(etcd.endpoints, namespace=namespace)
        thread = threading.Thread(target=wait_for_permit, args=(instance, name))
        thread.start()
        waiting.append((thread, instance))
        wait_until(lambda: queued(raw) == len(waiting) + 2)
    try:
        second.__exit__(None, None, None)
        assert got["A"].wait(timeout=30)
        first.__exit__(None, None, None)
        assert got["B"].wait(timeout=30)
        assert not got["C"].is_set()  # A and B hold the two permits
        leave["A"].set()
        assert got["C"].wait(timeout=30)
    finally:
        for event in leave.values():
            event.set()
        for thread, instance in waiting:
            thread.join(timeout=30)
            instance.close()


@pytest.mark.parametrize("limit", [3, 10])  # 10: past the keys a waiter watches one by one
def test_any_holder_ahead_that_leaves_wakes_the_first_waiter(
    etcd: Etcd, patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw, limit: int
) -> None:
    with ExitStack() as stack:
        holdings = [patterns.semaphore("S", limit) for _ in range(limit)]
        for holding in holdings:
            stack.enter_context(holding)
        got: list[float] = []
        before = watchers(etcd)
        waiter = threading.Thread(
            target=lambda: got.append(_held_at(other.semaphore("S", limit, timeout=30)))
        )
        waiter.start()
        wait_until(lambda: watchers(etcd) > before)  # the waiter watches
        # A holder in the middle leaves, not the oldest.
        holdings[limit // 2].__exit__(None, None, None)
        released = time.monotonic()
        waiter.join(timeout=30)
        assert got
        assert got[0] - released < SCHEDULING_GRACE  # woken by its watch, not a re-read


def _held_at(holding: Any) -> float:
    with holding:
        return time.monotonic()


def test_guarded_writes_through_a_permit(patterns: EtcdPatterns, raw: Raw) -> None:
    with patterns.semaphore("S", 2) as permit:
        patterns.transform("data", lambda _: "held", default="", guard=permit)
    with pytest.raises(LockLostError):
        patterns.transform("data", lambda _: "stale", guard=permit)
    assert raw.value("data") == b"held"


def test_a_permit_lost_while_held_is_reported(patterns: EtcdPatterns, raw: Raw) -> None:
    holding = patterns.semaphore("S", 2, ttl=3)  # refreshed every second: the loss is heard soon
    permit: Permit = holding.__enter__()
    raw.revoke(permit.lease_id)
    assert permit.lost.wait(timeout=30)
    with pytest.raises(LockLostError):
        holding.__exit__(None, None, None)


# -- processes ------------------------------------------------------------------


def _bounded_worker(
    endpoints: list[str], namespace: str, rounds: int, first: Any, meet: Any, start: Any
) -> None:
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd:
        start.wait(timeout=60)
        for _ in range(rounds):
            with etcd.semaphore("S", 3, timeout=120) as permit:
                # A register of the holders right now, and the most ever seen,
                # changed only through the permit's fence.
                etcd.transform("holders", _enter, default="0 0", guard=permit)
                with first.get_lock():
                    early, first.value = first.value, first.value + 1
                if early < 3:
                    # The first three holders wait for each other: the limit
                    # is reached for sure, or the barrier breaks.
                    meet.wait(timeout=60)
                etcd.transform("holders", _leave, guard=permit)


def _enter(value: str) -> str:
    now, most = (int(word) for word in value.split())
    return f"{now + 1} {max(most, now + 1)}"


def _leave(value: str) -> str:
    now, most = (int(word) for word in value.split())
    return f"{now - 1} {most}"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_never_more_than_limit_holders_across_processes(
    etcd: Etcd, namespace: str, raw: Raw
) -> None:
    processes, rounds = 8, 20
    context = multiprocessing.get_context("spawn")
    first, meet = context.Value("i", 0), context.Barrier(3)
    run_processes(
        _bounded_worker, (etcd.endpoints, namespace, rounds, first, meet), processes, timeout=200
    )
    now, most = (int(word) for word in (raw.value("holders") or b"").split())
    print(f"{processes * rounds} permits taken; at most {most} held at once")
    assert now == 0
    assert most == 3  # reached, never exceeded
    assert queued(raw) == 0


def _hold_and_hang(endpoints: list[str], namespace: str, ttl: int, ready: Any) -> None:
    etcd = EtcdPatterns.connect(endpoints, namespace=namespace)
    etcd.semaphore("S", 1, ttl=ttl).__enter__()
    ready.set()
    threading.Event().wait()  # until SIGKILL


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_killed_holders_permit_comes_back_within_its_ttl(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns
) -> None:
    ttl = 2
    with holder_to_kill(_hold_and_hang, etcd.endpoints, namespace, ttl) as kill:
        with pytest.raises(SemaphoreTimeoutError):
            patterns.semaphore("S", 1, timeout=0.2).__enter__()
        killed = kill()
        got_at = _held_at(patterns.semaphore("S", 1, timeout=ttl + 10))
    waited = got_at - killed
    print(f"permit back {waited:.2f}s after SIGKILL (ttl={ttl}s)")
    assert waited <= freed_within(ttl)


# -- introspection --------------------------------------------------------------


def test_contenders_lists_holders_then_waiters(
    patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    assert patterns.contenders("S") == []
    with patterns.semaphore("S", 1) as permit:
        waiter = threading.Thread(target=lambda: _held_at(other.semaphore("S", 1, timeout=30)))
        waiter.start()
        wait_until(lambda: queued(raw) == 2)
        holder, waiting = patterns.contenders("S")
        assert (holder.key, holder.fencing_token, holder.lease_id) == (
            permit.key,
            permit.fencing_token,
            permit.lease_id,
        )
        assert f"pid={os.getpid()}" in holder.value
        assert waiting.fencing_token > holder.fencing_token
    waiter.join(timeout=30)
    with patterns.elected("E", "me") as leadership:
        (leader,) = patterns.contenders("E")
        assert (leader.key, leader.value) == (leadership.key, "me")


# -- cost -----------------------------------------------------------------------


def test_costs_in_round_trips(etcd: Etcd, patterns: EtcdPatterns, other: EtcdPatterns) -> None:
    with patterns.semaphore("S", 2):  # the session lease is granted once, on first use
        pass
    with etcd.count_rpcs() as rpcs, patterns.semaphore("S", 2):
        pass
    assert rpcs.requests == {"etcdserverpb.KV/Txn": 2}  # nobody queued: record and register
    with other.semaphore("S", 2):
        with etcd.count_rpcs() as rpcs, patterns.semaphore("S", 2):
            pass
        # Found others queued: the limit recorded by them is checked instead.
        assert rpcs.requests == {"etcdserverpb.KV/Txn": 3}
        with etcd.count_rpcs() as rpcs, patterns.semaphore("S", 2):
            pass
        assert rpcs.requests == {"etcdserverpb.KV/Txn": 2}  # known to be queued behind others
    with etcd.count_rpcs() as rpcs:
        patterns.contenders("S")
    assert rpcs.requests == {"etcdserverpb.KV/Range": 1}
