"""Barriers and double barriers against a real etcd: blocking, waking, crashes, rounds."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import defaultdict
from typing import Any

import pytest

from etcd_patterns import (
    BarrierBrokenError,
    BarrierFullError,
    BarrierTimeoutError,
    EtcdPatterns,
)
from etcd_patterns.testing import EtcdCluster, ExternalEtcd
from tests.helpers import SCHEDULING_GRACE, Raw, freed_within, holder_to_kill, wait_until, watchers

Etcd = EtcdCluster | ExternalEtcd


# -- barrier --------------------------------------------------------------------


def test_hold_release_and_a_wait_on_a_lowered_barrier(
    etcd: Etcd, patterns: EtcdPatterns, raw: Raw
) -> None:
    barrier = patterns.barrier("gate")
    assert not barrier.is_held()
    with etcd.count_rpcs() as rpcs:
        barrier.wait(timeout=1)  # down: returns at once
    assert rpcs.requests == {"etcdserverpb.KV/Range": 1}
    assert barrier.hold()
    assert not barrier.hold()  # already up
    assert barrier.is_held()
    with pytest.raises(BarrierTimeoutError):
        barrier.wait(timeout=0.2)
    barrier.release()
    assert raw.value("gate") is None


def test_every_waiter_wakes_when_the_barrier_comes_down(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns
) -> None:
    barrier = patterns.barrier("gate")
    barrier.hold()
    instances = [EtcdPatterns.connect(etcd.endpoints, namespace=namespace) for _ in range(4)]
    woke: list[float] = []
    before = watchers(etcd)

    def wait_for(instance: EtcdPatterns) -> None:
        instance.barrier("gate").wait(timeout=30)
        woke.append(time.monotonic())

    waiting = [threading.Thread(target=wait_for, args=(instance,)) for instance in instances]
    try:
        for thread in waiting:
            thread.start()
        wait_until(lambda: watchers(etcd) >= before + len(waiting))  # all of them watch
        assert woke == []
        released = time.monotonic()
        barrier.release()
        for thread in waiting:
            thread.join(timeout=30)
    finally:
        for instance in instances:
            instance.close()
    delays = sorted(at - released for at in woke)
    print(f"waiters woke {[f'{d * 1000:.0f} ms' for d in delays]} after the release")
    assert len(delays) == len(waiting)
    assert delays[-1] < SCHEDULING_GRACE


def test_a_barrier_set_by_other_clients_is_waited_on(
    etcd: Etcd, patterns: EtcdPatterns, raw: Raw
) -> None:
    # Go's recipe.Barrier.Hold creates the key itself, without a lease.
    raw.put("gate", "")
    done = threading.Event()
    before = watchers(etcd)

    def wait_for_it() -> None:
        patterns.barrier("gate").wait(timeout=30)
        done.set()

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    wait_until(lambda: watchers(etcd) > before)  # it read the key, and watches it
    assert not done.is_set()
    raw.client.delete(raw.key("gate"))
    waiter.join(timeout=30)
    assert done.is_set()


def _hold_and_hang(endpoints: list[str], namespace: str, ttl: int, ready: Any) -> None:
    etcd = EtcdPatterns.connect(endpoints, namespace=namespace)
    etcd.barrier("gate").hold(ttl=ttl)
    ready.set()
    threading.Event().wait()  # until SIGKILL


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_barrier_held_with_a_ttl_comes_down_when_its_holder_dies(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns
) -> None:
    ttl = 2
    with holder_to_kill(_hold_and_hang, etcd.endpoints, namespace, ttl) as kill:
        assert patterns.barrier("gate").is_held()
        killed = kill()
        patterns.barrier("gate").wait(timeout=ttl + 10)
        lowered = time.monotonic() - killed
    print(f"barrier down {lowered:.2f}s after its holder's SIGKILL (ttl={ttl}s)")
    assert lowered <= freed_within(ttl)


# -- double barrier -------------------------------------------------------------


def test_rounds_begin_together_and_end_together(etcd: Etcd, namespace: str, raw: Raw) -> None:
    participants, rounds = 5, 10
    entered: dict[int, list[float]] = defaultdict(list)  # round -> times inside, at its start
    finished: dict[int, list[float]] = defaultdict(list)  # round -> times the block ended
    left: dict[int, list[float]] = defaultdict(list)  # round -> times leaving returned
    numbers: dict[int, set[int]] = defaultdict(set)
    instances = [
        EtcdPatterns.connect(etcd.endpoints, namespace=namespace) for _ in range(participants)
    ]

    def take_part(instance: EtcdPatterns) -> None:
        for k in range(rounds):
            with instance.double_barrier("DB", participants, timeout=60) as taking_part:
                entered[k].append(time.monotonic())
                numbers[k].add(taking_part.round)
                finished[k].append(time.monotonic())
            left[k].append(time.monotonic())

    threads = [threading.Thread(target=take_part, args=(i,)) for i in instances]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for instance in instances:
            instance.close()
    for k in range(rounds):
        assert len(entered[k]) == len(left[k]) == participants
        assert len(numbers[k]) == 1  # one round, the same for all
        # Nobody is done leaving round k before everyone is in it ...
        assert min(left[k]) >= max(entered[k])
        # ... and nobody is in round k+1 before everyone ended round k.
        if k + 1 < rounds:
            assert min(entered[k + 1]) >= max(finished[k])
            assert min(numbers[k + 1]) > max(numbers[k])
    assert raw.count("DB/") == 0  # the last round cleaned up after itself


def _enter_and_hang(endpoints: list[str], namespace: str, ttl: int, ready: Any) -> None:
    etcd = EtcdPatterns.connect(endpoints, namespace=namespace)
    etcd.double_barrier("DB", 3, ttl=ttl, timeout=30).__enter__()
    ready.set()
    threading.Event().wait()  # until SIGKILL, mid-round


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_participant_killed_mid_round_breaks_it_for_the_others(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    ttl = 2
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    doomed = context.Process(target=_enter_and_hang, args=(etcd.endpoints, namespace, ttl, ready))
    outcomes: list[tuple[str, float]] = []

    def take_part(instance: EtcdPatterns) -> None:
        try:
            with instance.double_barrier("DB", 3, timeout=30):
                assert ready.wait(timeout=30)
        except BarrierBrokenError:
            outcomes.append(("broken", time.monotonic()))

    threads = [threading.Thread(target=take_part, args=(i,)) for i in (patterns, other)]
    doomed.start()
    try:
        for thread in threads:
            thread.start()
        assert ready.wait(timeout=30)  # all three are in the round
        os.kill(doomed.pid or 0, signal.SIGKILL)
        killed = time.monotonic()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        doomed.kill()
        doomed.join()
    assert [what for what, _ in outcomes] == ["broken", "broken"]
    slowest = max(at for _, at in outcomes) - killed
    print(f"the others heard the round broke {slowest:.2f}s after the SIGKILL (ttl={ttl}s)")
    assert slowest <= freed_within(ttl)
    wait_until(lambda: raw.count("DB/") == 0)  # the broken round left nothing behind
    with patterns.double_barrier("DB", 1, timeout=10):  # and the name can be used again
        pass


def test_a_block_that_raises_breaks_the_round_and_the_next_one_works(
    patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    got: list[str] = []
    inside = threading.Barrier(2)

    def survivor() -> None:
        try:
            with other.double_barrier("DB", 2, timeout=30):
                inside.wait(timeout=30)
        except BarrierBrokenError:
            got.append("broken")

    thread = threading.Thread(target=survivor)
    thread.start()
    with pytest.raises(RuntimeError):
        _fail_inside(patterns, inside)
    thread.join(timeout=30)
    assert got == ["broken"]
    wait_until(lambda: raw.count("DB/") == 0)
    done = threading.Thread(target=lambda: _pass_through(other))
    done.start()
    _pass_through(patterns)
    done.join(timeout=30)


def _fail_inside(instance: EtcdPatterns, inside: threading.Barrier) -> None:
    with instance.double_barrier("DB", 2, timeout=30):
        inside.wait(timeout=30)
        raise RuntimeError("the work failed")


def _pass_through(instance: EtcdPatterns) -> None:
    with instance.double_barrier("DB", 2, timeout=30):
        pass


def test_one_too_many_is_refused(patterns: EtcdPatterns, raw: Raw) -> None:
    # Two participants in, the round not begun yet: a third is one too many.
    lease = raw.grant(30)
    for name in ("a", "b"):
        raw.put(f"DB/waiters/{name}", "entered", lease=lease)
    with pytest.raises(BarrierFullError):
        patterns.double_barrier("DB", 2, timeout=10).__enter__()
    assert raw.count("DB/waiters/") == 2  # the third withdrew its key
    raw.revoke(lease)


def test_a_newcomer_during_a_round_waits_for_the_next(
    patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    holding = patterns.double_barrier("DB", 1, timeout=10)
    holding.__enter__()  # a round of one, under way
    with pytest.raises(BarrierTimeoutError):
        other.double_barrier("DB", 1, timeout=0.3).__enter__()
    holding.__exit__(None, None, None)
    with other.double_barrier("DB", 1, timeout=10) as taking_part:
        assert taking_part.participants == 1


def test_a_newcomer_is_not_held_up_by_a_round_whose_participants_all_died(
    etcd: Etcd, patterns: EtcdPatterns, raw: Raw
) -> None:
    # A round of two under way, whose participants then die together.
    lease = raw.grant(30)
    for name in ("a", "b"):
        raw.put(f"DB/waiters/{name}", "entered", lease=lease)
    raw.put("DB/ready", str(raw.get("DB/waiters/b").create_revision))
    entered = threading.Event()

    def newcomer() -> None:
        with patterns.double_barrier("DB", 1, timeout=30):
            entered.set()

    before = watchers(etcd)
    thread = threading.Thread(target=newcomer)
    thread.start()
    wait_until(lambda: watchers(etcd) > before)  # it waits for the round to end
    assert not entered.is_set()
    raw.revoke(lease)  # both die: their keys go, name/ready stays
    thread.join(timeout=30)
    assert entered.is_set()
    assert raw.count("DB/") == 0


def test_a_leaving_that_fails_breaks_the_round_instead_of_blocking_the_name(
    patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    both_in = threading.Barrier(2)
    release_worker = threading.Event()
    outcome: list[str] = []

    def slow_worker() -> None:
        try:
            with other.double_barrier("DB", 2, timeout=30):
                both_in.wait(timeout=30)
                release_worker.wait(timeout=30)  # still working when the other gives up
        except BarrierBrokenError:
            outcome.append("broken")

    worker = threading.Thread(target=slow_worker)
    worker.start()
    leaving = patterns.double_barrier("DB", 2, timeout=0.5)
    leaving.__enter__()
    both_in.wait(timeout=30)
    with pytest.raises(BarrierTimeoutError):
        leaving.__exit__(None, None, None)  # the worker has not left in time
    release_worker.set()
    worker.join(timeout=30)
    assert outcome == ["broken"]
    assert raw.count("DB/") == 0  # nothing left to block the next round
    with patterns.double_barrier("DB", 1, timeout=10):
        pass
