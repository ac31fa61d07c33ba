"""Group membership and watched values against a real etcd."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pytest

from etcd_patterns import (
    EtcdPatterns,
    InvalidArgumentError,
    InvalidTypeError,
    MemberExistsError,
    MembershipLostError,
    OutcomeUnknownError,
    WatchTimeoutError,
)
from etcd_patterns._wait import RECHECK_INTERVAL
from etcd_patterns.testing import EtcdCluster, ExternalEtcd
from tests.helpers import (
    FaultInjector,
    Raw,
    client_with_faults,
    freed_within,
    holder_to_kill,
    resolves,
    wait_until,
    watchers,
)

Etcd = EtcdCluster | ExternalEtcd

pytestmark = pytest.mark.timeout(60)

TXN = "/etcdserverpb.KV/Txn"


# -- watched values ---------------------------------------------------------------------


def test_watch_values_yields_the_state_then_each_change(patterns: EtcdPatterns, raw: Raw) -> None:
    states = patterns.watch_values("cfg", timeout=5)
    assert next(states) == []
    raw.put("cfg/a", "1")
    assert next(states) == ["1"]
    raw.put("cfg/b", "2")
    assert next(states) == ["1", "2"]
    raw.put("cfg/a/deeper", "not a child")  # not a direct child: no new state
    raw.put("cfg/b", "3")
    assert next(states) == ["1", "3"]
    raw.put("cfg", "own value")  # the key itself holds a value now
    assert next(states) == ["own value"]
    states.close()


def test_the_last_state_of_a_thousand_rapid_updates_is_yielded(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    written = [str(i) for i in range(1000)]
    states = patterns.watch_values("k", timeout=10)
    assert next(states) == []
    writer = threading.Thread(target=lambda: [raw.put("k", value) for value in written])
    writer.start()
    seen = []
    for state in states:
        seen.append(state)
        if state == [written[-1]]:
            break
    writer.join()
    states.close()
    assert seen[-1] == [written[-1]]
    assert all(len(state) == 1 and state[0] in written for state in seen)  # all were written
    numbers = [int(state[0]) for state in seen]
    assert numbers == sorted(numbers)  # never back in time
    print(f"{len(seen)} states yielded for {len(written)} updates")


def test_a_watch_times_out_and_closing_it_stops_its_watch(
    etcd: Etcd, patterns: EtcdPatterns
) -> None:
    before = watchers(etcd)
    states = patterns.watch_values("quiet", timeout=0.3)
    assert next(states) == []
    with pytest.raises(WatchTimeoutError):
        next(states)
    states.close()
    wait_until(lambda: watchers(etcd) == before)


def test_watch_values_costs_one_read_and_one_watch_per_change(
    etcd: Etcd, patterns: EtcdPatterns, raw: Raw
) -> None:
    states = patterns.watch_values("cfg", timeout=5)
    with etcd.count_rpcs() as rpcs:
        assert next(states) == []
    assert rpcs.kv == 1
    got: list[list[str]] = []
    waiter = threading.Thread(target=lambda: got.append(next(states)))
    with etcd.count_rpcs() as rpcs:
        waiter.start()
        wait_until(lambda: watchers(etcd) >= 2)  # the key and its children
        put_at = time.monotonic()
        raw.put("cfg/a", "1")
        waiter.join()
        # Woken by the watch's event, not by the loop's periodic read.
        assert time.monotonic() - put_at < RECHECK_INTERVAL / 2
    assert got == [["1"]]
    # One watch stream, and one read after the change; the put is the test's.
    assert rpcs.requests["etcdserverpb.Watch/Watch"] == 1
    assert rpcs.requests["etcdserverpb.KV/Txn"] == 1
    states.close()


# -- membership -------------------------------------------------------------------------------


def test_join_update_and_leave(
    etcd: Etcd, patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    with patterns.member("workers", "w1", "10.0.0.1") as me:
        with etcd.count_rpcs() as rpcs:
            assert patterns.members("workers") == {"w1": "10.0.0.1"}
        assert rpcs.kv == 1
        assert (me.group, me.member_id, me.key, me.value) == (
            "workers",
            "w1",
            "workers/w1",
            "10.0.0.1",
        )
        with other.member("workers", "w2") as second:
            assert other.members("workers") == {"w1": "10.0.0.1", "w2": ""}
            me.update("10.0.0.9")
            assert me.value == "10.0.0.9"
            assert second.fencing_token > me.fencing_token
        assert patterns.members("workers") == {"w1": "10.0.0.9"}
        assert raw.get("workers/w1").lease == me.lease_id
    assert patterns.members("workers") == {}


def test_joining_twice_with_one_id_is_refused_and_writes_nothing(
    patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    with patterns.member("workers", "w1", "first"):
        before = raw.snapshot()
        with pytest.raises(MemberExistsError), other.member("workers", "w1", "second"):
            pass
        assert raw.snapshot() == before
    assert patterns.members("workers") == {}


def test_a_key_without_a_lease_is_not_a_member(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("shards/data", "not a member")  # no lease: it would never leave
    with patterns.partitioner("shards", "p1", ITEMS) as part:
        assert patterns.members("shards") == {"p1": ""}
        assert part.owned() == ITEMS
    assert patterns.members("shards") == {}
    before = raw.snapshot()
    with (
        pytest.raises(MemberExistsError, match="holds data"),
        patterns.member("shards", "data"),
    ):
        pass
    assert raw.snapshot() == before


def test_a_member_whose_lease_is_lost_cannot_update_or_guard(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    joined = patterns.member("workers", "w1", ttl=5)
    me = joined.__enter__()
    raw.revoke(me.lease_id)
    assert me.lost.wait(timeout=10)
    before = raw.snapshot()
    with pytest.raises(MembershipLostError):
        me.update("late")
    with pytest.raises(MembershipLostError):
        patterns.transform("result", lambda _: "x", default="", guard=me)
    assert raw.snapshot() == before
    with pytest.raises(MembershipLostError):
        joined.__exit__(None, None, None)


def _member_and_hang(endpoints: list[str], namespace: str, ttl: int, ready: Any) -> None:
    etcd = EtcdPatterns.connect(endpoints, namespace=namespace)
    etcd.member("workers", "doomed", ttl=ttl).__enter__()
    ready.set()
    threading.Event().wait()  # until SIGKILL


@pytest.mark.slow
def test_a_killed_member_leaves_within_its_ttl_and_the_watch_says_so(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns
) -> None:
    ttl = 2
    with contextlib.ExitStack() as stack:
        # Four members, each on an instance (a session lease) of its own,
        # and a fifth in a process that is killed.
        instances = [
            stack.enter_context(EtcdPatterns.connect(etcd.endpoints, namespace=namespace))
            for _ in range(4)
        ]
        for index, instance in enumerate(instances):
            stack.enter_context(instance.member("workers", f"w{index}", ttl=ttl))
        kill = stack.enter_context(holder_to_kill(_member_and_hang, etcd.endpoints, namespace, ttl))
        follow = patterns.watch_members("workers", timeout=freed_within(ttl))
        assert set(next(follow)) == {"w0", "w1", "w2", "w3", "doomed"}
        killed = kill()
        assert set(next(follow)) == {"w0", "w1", "w2", "w3"}
        assert time.monotonic() - killed < freed_within(ttl)
        assert set(patterns.members("workers")) == {"w0", "w1", "w2", "w3"}
        follow.close()
    assert patterns.members("workers") == {}


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda etcd: etcd.member("workers", "").__enter__(), InvalidArgumentError),
        (lambda etcd: etcd.member("workers", "a/b").__enter__(), InvalidArgumentError),
        (lambda etcd: etcd.member("workers", 5).__enter__(), InvalidTypeError),
        (lambda etcd: etcd.member("", "w1").__enter__(), InvalidArgumentError),
        (lambda etcd: etcd.member("workers", "w1", b"\xff").__enter__(), InvalidArgumentError),
        (lambda etcd: etcd.member("workers", "w1", ttl=0).__enter__(), InvalidArgumentError),
        (lambda etcd: etcd.members("workers/"), InvalidArgumentError),
        (lambda etcd: etcd.watch_members("workers", timeout=-1), InvalidArgumentError),
        (lambda etcd: etcd.watch_values("", timeout=1), InvalidArgumentError),
        (lambda etcd: etcd.watch_values("k", timeout="1"), InvalidTypeError),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    patterns: EtcdPatterns, raw: Raw, call: Any, error: type[Exception]
) -> None:
    before = raw.snapshot()
    with pytest.raises(error):
        call(patterns)
    assert raw.snapshot() == before


# -- partitioner ------------------------------------------------------------------------------

ITEMS = [f"shard-{i:03d}" for i in range(300)]


def _partition_and_hang(endpoints: list[str], namespace: str, ttl: int, ready: Any) -> None:
    etcd = EtcdPatterns.connect(endpoints, namespace=namespace)
    etcd.partitioner("shards", "doomed", ITEMS, ttl=ttl).__enter__()
    ready.set()
    threading.Event().wait()  # until SIGKILL


@pytest.mark.slow
def test_a_partitioner_shares_every_item_once_and_moves_few_on_a_change(
    etcd: Etcd, namespace: str
) -> None:
    ttl = 2
    with contextlib.ExitStack() as stack:
        instances = [
            stack.enter_context(EtcdPatterns.connect(etcd.endpoints, namespace=namespace))
            for _ in range(4)
        ]
        kill = stack.enter_context(
            holder_to_kill(_partition_and_hang, etcd.endpoints, namespace, ttl)
        )
        parts = [
            stack.enter_context(instance.partitioner("shards", f"p{i}", ITEMS, ttl=ttl))
            for i, instance in enumerate(instances[:2])
        ]
        follows = [part.changes(timeout=freed_within(ttl)) for part in parts]
        # Three members: every item owned once, from one read of the membership.
        shares = [next(follow) for follow in follows]
        doomed = [item for item in ITEMS if item not in shares[0] + shares[1]]
        assert sorted(shares[0] + shares[1] + doomed) == ITEMS
        assert not set(shares[0]) & set(shares[1])
        assert all(len(share) > 50 for share in [*shares, doomed])  # roughly a third each
        # The killed member's items are re-owned within its TTL and the sweep.
        killed = kill()
        after = [next(follow) for follow in follows]
        assert time.monotonic() - killed < freed_within(ttl)
        assert sorted(after[0] + after[1]) == ITEMS
        assert set(shares[0]) <= set(after[0])  # only the dead member's items moved
        assert set(shares[1]) <= set(after[1])
        # A third member joins, then a fourth: the fourth takes about a
        # quarter of the items from the three, and nothing else moves.
        with instances[2].partitioner("shards", "p2", ITEMS, ttl=ttl) as third:
            follows.append(third.changes(timeout=freed_within(ttl)))
            three = [next(follow) for follow in follows]
            assert sorted(three[0] + three[1] + three[2]) == ITEMS
            with instances[3].partitioner("shards", "p3", ITEMS, ttl=ttl) as fourth:
                four = [next(follow) for follow in follows]
                taken = fourth.owned()
                moved = sum(len(set(a) - set(b)) for a, b in zip(three, four, strict=True))
                print(f"a fourth member took {len(taken)} of {len(ITEMS)} items; {moved} moved")
                assert moved == len(taken)
                assert 40 < moved < 110  # about 1/4 of 300, not all
                assert sorted(four[0] + four[1] + four[2] + taken) == ITEMS
        for follow in follows:
            follow.close()


def test_a_partition_lock_makes_a_handover_wait(
    patterns: EtcdPatterns, other: EtcdPatterns
) -> None:
    with patterns.partitioner("shards", "old", ITEMS) as old:
        item = old.owned()[0]
        with old.lock(item, timeout=1) as held, other.partitioner("shards", "new", ITEMS) as new:
            with pytest.raises(TimeoutError):  # the old owner still works on it
                new.lock(item, timeout=0.2).__enter__()
            assert held.is_owner()


def test_bad_items_are_refused_and_change_nothing(patterns: EtcdPatterns, raw: Raw) -> None:
    before = raw.snapshot()
    with pytest.raises(InvalidTypeError):
        patterns.partitioner("shards", "p", "not a list")
    with pytest.raises(InvalidTypeError):
        patterns.partitioner("shards", "p", [1, 2])  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError):
        patterns.partitioner("shards", "p", ["a", "a"])
    assert raw.snapshot() == before


def test_a_member_deleted_by_another_client_is_told_on_leaving(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    joined = patterns.member("workers", "w1")
    joined.__enter__()
    raw.client.delete(raw.key("workers/w1"))  # an operator removes it
    with pytest.raises(MembershipLostError):
        joined.__exit__(None, None, None)


def test_a_partition_whose_id_was_taken_over_owns_nothing(
    patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    partitioned = patterns.partitioner("shards", "p1", ITEMS)
    old = partitioned.__enter__()
    assert old.owned() == ITEMS
    raw.client.delete(raw.key("shards/p1"))  # removed, and its id taken by another
    with other.partitioner("shards", "p1", ITEMS) as new:
        assert new.owned() == ITEMS
        with pytest.raises(MembershipLostError):
            old.owned()  # the same id, but not this member's key
        with pytest.raises(MembershipLostError):
            partitioned.__exit__(None, None, None)  # and leaving says so


def test_items_that_cannot_name_a_lock_are_refused(patterns: EtcdPatterns, raw: Raw) -> None:
    before = raw.snapshot()
    for items in (["a", ""], ["a/b"], ["\ud800"]):
        with pytest.raises(InvalidArgumentError):
            patterns.partitioner("shards", "p", items)
    assert raw.snapshot() == before


def test_a_join_in_doubt_is_settled_before_the_id_joins_again(
    etcd: Etcd, namespace: str, raw: Raw
) -> None:
    away = threading.Event()
    away.set()

    def plan(method: str, request: Any) -> str:
        if method != TXN or not away.is_set():
            return "pass"
        joins = any(b"/workers/" in op.request_put.key for op in request.success)
        return "hold" if joins or resolves(request) else "pass"

    client = client_with_faults(etcd.endpoints, FaultInjector(plan))
    with EtcdPatterns(client, namespace=namespace, timeout=1, session_ttl=2) as faulty:
        with pytest.raises(OutcomeUnknownError), faulty.member("workers", "w1"):
            pass
        # Its key may exist; the session deletes it by name once etcd
        # answers, so the id may not join again until then.
        with (
            pytest.raises(MemberExistsError, match="still in doubt"),
            faulty.member("workers", "w1"),
        ):
            pass
        away.clear()
        # The session's next refresh, a third of its TTL, settles it.
        wait_until(lambda: not faulty._sessions.abandoned(None, raw.key("workers/w1")))
        with faulty.member("workers", "w1") as me:
            assert faulty.members("workers") == {"w1": ""}
            assert not me.lost.is_set()
    client.close()
    assert raw.count("workers/") == 0
