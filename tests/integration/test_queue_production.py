"""The queue in production: priorities, delivery counts, dead letters, poison items, inspection."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from etcd_patterns import (
    PRIORITY_MAX,
    PRIORITY_MIN,
    ClaimLostError,
    EtcdPatterns,
    InvalidArgumentError,
    InvalidTypeError,
    OutcomeUnknownError,
    QueueEmptyError,
    QueueStats,
    ValueTooLargeError,
)
from etcd_patterns._queue import (
    CHUNK,
    ERROR_CHARS,
    FAR,
    MAX_REDELIVERY_DELAY,
    PREFETCH,
    REDELIVERY_DELAY,
    REQUEUE_CHUNK,
    parse_id,
    redelivery_delay,
)
from etcd_patterns.testing import EtcdCluster, ExternalEtcd
from tests.helpers import (
    SCHEDULING_GRACE,
    FaultInjector,
    Raw,
    client_with_faults,
    holder_to_kill,
    resolves,
    run_together,
)

Etcd = EtcdCluster | ExternalEtcd

pytestmark = pytest.mark.timeout(60)


# -- priorities ---------------------------------------------------------------------


def test_a_consumer_sees_priorities_in_order_and_each_in_fifo_order(
    patterns: EtcdPatterns,
) -> None:
    enqueued: list[tuple[int, str]] = []
    for i in range(30):
        priority = (7 * i) % 5 - 2  # -2 to 2, interleaved
        patterns.enqueue("q", f"{priority}:{i}", priority=priority)
        enqueued.append((priority, f"{priority}:{i}"))
    patterns.enqueue_many("q", ["m0", "m1", "m2"], priority=PRIORITY_MIN)
    patterns.enqueue_many("q", ["z0", "z1"], priority=PRIORITY_MAX)
    expected = ["m0", "m1", "m2"]
    expected += [value for _, value in sorted(enqueued, key=lambda pair: pair[0])]  # stable
    expected += ["z0", "z1"]
    assert patterns.get_values("q") == expected  # the listing is the serving order
    served = [patterns.dequeue("q", timeout=0) for _ in range(10)]
    served += patterns.dequeue_many("q", 15)
    with patterns.claim("q", timeout=0) as item:
        served.append(item.value)
    served += patterns.dequeue_many("q", 100)
    assert served == expected


def test_an_urgent_item_is_served_before_a_backlog_at_the_next_read(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns
) -> None:
    patterns.enqueue_many("q", [f"backlog-{i}" for i in range(100)])
    with EtcdPatterns.connect(etcd.endpoints, namespace=namespace, prefetch=1) as consumer:
        # Each take reads the next head in its own transaction: that read
        # came before the urgent item, which waits behind it alone.
        assert consumer.dequeue("q", timeout=0) == "backlog-0"
        patterns.enqueue("q", "urgent", priority=-1)
        assert consumer.dequeue("q", timeout=0) == "backlog-1"
        assert consumer.dequeue("q", timeout=0) == "urgent"


def test_item_ids_carry_priority_and_enqueue_time(patterns: EtcdPatterns) -> None:
    before = time.time()
    key = patterns.enqueue("q", "x", priority=-7)
    after = time.time()
    parsed = parse_id(key.rpartition("/")[2].encode())
    assert parsed is not None
    priority, enqueued_at = parsed
    assert priority == -7
    assert before <= enqueued_at <= after


# -- delivery counts, dead letters, backoff --------------------------------------------


def test_an_item_that_always_fails_goes_to_the_dead_letters_with_count_and_error(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    patterns.enqueue("q", "bad")
    patterns.enqueue("q", "good")
    counts: list[int] = []
    good: list[str] = []
    for _ in range(4):
        try:
            with patterns.claim("q", timeout=0, max_deliveries=3, redelivery_delay=0) as item:
                if item.value == "good":
                    good.append(item.value)
                    continue
                counts.append(item.delivery_count)
                raise RuntimeError(f"cannot process {item.value} #{item.delivery_count}")
        except RuntimeError:
            pass
    assert counts == [1, 2, 3]
    assert good == ["good"]
    assert raw.count("q/") == 0
    (dead,) = patterns.peek("q.dead")
    assert dead.value == "bad"
    assert dead.delivery_count == 3
    assert dead.last_error == "RuntimeError: cannot process bad #3"
    assert dead.reason == "delivered 3 times, and max_deliveries is 3"
    assert raw.count(".etcd-patterns/claims/") == 0
    with pytest.raises(QueueEmptyError):
        patterns.dequeue("q", timeout=0)


def _claim_and_hang(endpoints: list[str], namespace: str, ttl: int, ready: Any) -> None:
    etcd = EtcdPatterns.connect(endpoints, namespace=namespace)
    etcd.claim("q", ttl=ttl).__enter__()
    ready.set()
    threading.Event().wait()  # until SIGKILL


def test_a_claim_lost_in_a_crash_counts_as_a_delivery(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    ttl = 60
    patterns.enqueue("q", "job")
    with holder_to_kill(_claim_and_hang, etcd.endpoints, namespace, ttl) as kill:
        kill()
    # The crashed consumer's claim goes with its lease (ended here at once,
    # rather than after its TTL); the item comes back.
    ((_, claim),) = list(raw.client.get_prefix(raw.key(".etcd-patterns/claims/")))
    raw.revoke(claim.lease_id)
    with patterns.claim("q", timeout=5, max_deliveries=2) as item:
        assert item.delivery_count == 2
        item.release("still failing")
    # Due a third delivery, with two allowed: it moves to the dead letters.
    with pytest.raises(QueueEmptyError):
        patterns.dequeue("q", timeout=0)
    (dead,) = patterns.peek("q.dead")
    assert (dead.value, dead.delivery_count, dead.last_error) == ("job", 2, "still failing")


def test_a_released_item_waits_out_its_delay_while_others_flow(
    patterns: EtcdPatterns, other: EtcdPatterns
) -> None:
    patterns.enqueue("q", "flaky")
    patterns.enqueue("q", "fine")
    delay = 0.5
    released = time.monotonic()
    with patterns.claim("q", redelivery_delay=delay) as item:
        item.release(ValueError("not yet"))
    # Another consumer gets the next item at once, not the released one.
    assert other.dequeue("q", timeout=0) == "fine"
    with pytest.raises(QueueEmptyError):
        other.dequeue("q", timeout=0)
    # A consumer that waits is woken when the delay ends: by its own clock,
    # since no event in etcd marks it.
    with other.claim("q", timeout=delay + SCHEDULING_GRACE) as again:
        waited = time.monotonic() - released
        assert again.value == "flaky"
        assert again.delivery_count == 2
        assert again.last_error == "ValueError: not yet"
    assert waited >= delay


def test_redelivery_delays_double_up_to_the_maximum() -> None:
    assert [redelivery_delay(REDELIVERY_DELAY, n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert redelivery_delay(REDELIVERY_DELAY, 50) == MAX_REDELIVERY_DELAY
    assert redelivery_delay(0, 5) == 0
    assert redelivery_delay(MAX_REDELIVERY_DELAY, 3) == MAX_REDELIVERY_DELAY


def test_a_delay_from_a_clock_far_ahead_hides_an_item_no_longer_than_the_maximum(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    key = patterns.enqueue("q", "x")
    item_id = key.rpartition("/")[2]
    records = raw.key(".etcd-patterns/deliveries/") + raw.key("q").hex().encode() + b"/"
    raw.client.put(records + item_id.encode(), b'{"deliveries": 1, "retry_at": 1e300}')
    (shown,) = patterns.peek("q")
    assert shown.retry_at is not None
    assert shown.retry_at <= time.time() + MAX_REDELIVERY_DELAY
    raw.client.put(records + item_id.encode(), b'{"deliveries": 1, "retry_at": "soon"}')
    assert patterns.dequeue("q", timeout=0) == "x"  # a record it cannot read delays nothing


def test_a_failing_item_does_not_starve_the_others(patterns: EtcdPatterns) -> None:
    # One consumer, whose handler always fails on one item: the good items
    # still flow, and the bad one is delivered only as its delays allow.
    patterns.enqueue("q", "bad")
    patterns.enqueue_many("q", [f"good-{i}" for i in range(20)])
    deliveries: list[str] = []
    while len([d for d in deliveries if d.startswith("good")]) < 20:
        try:
            with patterns.claim("q", timeout=2, redelivery_delay=REDELIVERY_DELAY) as item:
                deliveries.append(item.value)
                if item.value == "bad":
                    raise RuntimeError("always")
        except RuntimeError:
            pass
    assert deliveries.count("bad") == 1  # its first delay outlasts the 20 good items


def test_ack_and_release_settle_inside_the_block(patterns: EtcdPatterns, raw: Raw) -> None:
    patterns.enqueue_many("q", ["a", "b"])
    with patterns.claim("q") as item:
        item.ack()
        with pytest.raises(ClaimLostError, match="already acked"):
            item.release()
        raise_later = RuntimeError("after the ack")
    assert raw.count("q/") == 1

    def release_then_fail() -> None:
        with patterns.claim("q", redelivery_delay=0) as item:
            item.release("given back")
            raise raise_later  # leaves the released item alone

    with pytest.raises(RuntimeError):
        release_then_fail()
    (left,) = patterns.peek("q")
    assert (left.value, left.delivery_count, left.last_error) == ("b", 1, "given back")


def test_a_long_error_is_cut_short(patterns: EtcdPatterns) -> None:
    patterns.enqueue("q", "x")
    with patterns.claim("q") as item:
        item.release("e" * (ERROR_CHARS + 100))
    (left,) = patterns.peek("q")
    assert left.last_error == "e" * ERROR_CHARS


def test_requeue_moves_dead_letters_back_in_chunks(patterns: EtcdPatterns, raw: Raw) -> None:
    count = REQUEUE_CHUNK + 5
    patterns.enqueue_many("q", [str(i) for i in range(count)], priority=3)
    for _ in range(count):
        with patterns.claim("q", max_deliveries=1, redelivery_delay=0) as item:
            item.release("failed")
    assert raw.count("q/") == 0
    assert patterns.queue_stats("q").dead_letters == count
    assert patterns.requeue("q.dead", "q", max_items=2) == 2
    assert patterns.requeue("q.dead", "q") == count - 2
    assert patterns.requeue("q.dead", "q") == 0
    assert raw.count("q.dead/") == 0
    items = patterns.peek("q", n=count)
    assert [item.value for item in items] == [str(i) for i in range(count)]
    assert {(item.priority, item.delivery_count, item.last_error) for item in items} == {
        (3, 0, None)
    }


# -- poison items ---------------------------------------------------------------------------


def test_a_poison_item_at_the_head_never_blocks_three_consumers(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    raw.put("q/0000-poison", b"\xff\xfe")  # first in line, not UTF-8
    patterns.enqueue_many("q", [str(i) for i in range(100)])
    received: list[list[str]] = [[], [], []]

    def consume(out: list[str], use_claims: bool) -> None:
        with EtcdPatterns.connect(etcd.endpoints, namespace=namespace) as consumer:
            while True:
                try:
                    if use_claims:
                        with consumer.claim("q", timeout=0.2) as item:
                            out.append(item.value)
                    else:
                        out.append(consumer.dequeue("q", timeout=0.2))
                except QueueEmptyError:
                    return

    run_together(
        [
            lambda: consume(received[0], False),
            lambda: consume(received[1], False),
            lambda: consume(received[2], True),
        ]
    )
    delivered = [value for out in received for value in out]
    assert sorted(delivered, key=int) == [str(i) for i in range(100)]
    assert raw.value("q.dead/0000-poison") == b"\xff\xfe"
    assert raw.count("q.dead/") == 1
    (dead,) = patterns.peek("q.dead")
    assert dead.reason == "the value is not UTF-8"


# -- inspection ------------------------------------------------------------------------------


def test_queue_stats_match_a_known_state(etcd: Etcd, patterns: EtcdPatterns, raw: Raw) -> None:
    started = time.time()
    patterns.enqueue_many("q", ["u1", "u2"], priority=-1)
    patterns.enqueue_many("q", ["a", "b", "c", "d"])
    patterns.enqueue("q", "late", priority=5)
    raw.put("q/deeper/key", "not an item")
    patterns.enqueue_many("q.dead", ["x", "y"])
    claiming = patterns.claim("q")
    assert claiming.__enter__().value == "u1"  # in flight
    with patterns.claim("q", redelivery_delay=60) as item:
        assert item.value == "u2"
        item.release("later")  # delayed, and still pending
    with etcd.count_rpcs() as rpcs:
        stats = patterns.queue_stats("q")
    assert rpcs.kv == 1
    assert stats == QueueStats(
        pending={-1: 1, 0: 4, 5: 1},
        in_flight=1,
        delayed=1,
        oldest_age=stats.oldest_age,
        dead_letters=2,
        revision=raw.revision(),
    )
    assert stats.total_pending == 6
    assert stats.oldest_age is not None
    assert 0 <= stats.oldest_age <= time.time() - started
    claiming.__exit__(None, None, None)
    assert patterns.queue_stats("q").in_flight == 0
    empty = patterns.queue_stats("nothing-here")
    assert (empty.pending, empty.in_flight, empty.oldest_age, empty.dead_letters) == (
        {},
        0,
        None,
        0,
    )


def test_peek_lists_without_taking(etcd: Etcd, patterns: EtcdPatterns, raw: Raw) -> None:
    keys = patterns.enqueue_many("q", ["a", "b", "c"])
    urgent = patterns.enqueue("q", "urgent", priority=-1)
    claiming = patterns.claim("q")
    assert claiming.__enter__().value == "urgent"
    before = raw.revision()
    with etcd.count_rpcs() as rpcs:
        shown = patterns.peek("q", n=3)
    assert rpcs.kv == 1
    assert raw.revision() == before
    assert [(item.key, item.value, item.claimed) for item in shown] == [
        (urgent, "urgent", True),
        (keys[0], "a", False),
        (keys[1], "b", False),
    ]
    assert shown[0].delivery_count == 1
    assert shown[1].priority == 0
    claiming.__exit__(None, None, None)


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda etcd: etcd.enqueue("q", "x", priority=PRIORITY_MAX + 1), InvalidArgumentError),
        (lambda etcd: etcd.enqueue("q", "x", priority=PRIORITY_MIN - 1), InvalidArgumentError),
        (lambda etcd: etcd.enqueue("q", "x", priority=1.5), InvalidTypeError),
        (lambda etcd: etcd.enqueue("q", "x", priority=True), InvalidTypeError),
        (lambda etcd: etcd.enqueue_many("q", ["x"], priority="1"), InvalidTypeError),
        (lambda etcd: etcd.claim("q", max_deliveries=0), InvalidArgumentError),
        (lambda etcd: etcd.claim("q", max_deliveries=2.0), InvalidTypeError),
        (lambda etcd: etcd.claim("q", dead_letter="q"), InvalidArgumentError),
        (lambda etcd: etcd.claim("q", dead_letter=""), InvalidArgumentError),
        (lambda etcd: etcd.claim("q", redelivery_delay=-1), InvalidArgumentError),
        (lambda etcd: etcd.claim("q", redelivery_delay=None), InvalidTypeError),
        (lambda etcd: etcd.claim("q", redelivery_delay=61), InvalidArgumentError),
        (lambda etcd: etcd.claim("q", decode="yes"), InvalidTypeError),
        (lambda etcd: etcd.dequeue("q", dead_letter="q"), InvalidArgumentError),
        (lambda etcd: etcd.dequeue_many("q", 5, decode=1), InvalidTypeError),
        (lambda etcd: etcd.requeue("q", "q"), InvalidArgumentError),
        (lambda etcd: etcd.requeue("q.dead", "q", max_items=0), InvalidArgumentError),
        (lambda etcd: etcd.peek("q", n=0), InvalidArgumentError),
        (lambda etcd: etcd.queue_stats("q", dead_letter="q"), InvalidArgumentError),
    ],
)
def test_bad_options_are_refused_and_change_nothing(
    patterns: EtcdPatterns, raw: Raw, call: Any, error: type[Exception]
) -> None:
    patterns.enqueue("q", "x")
    patterns.enqueue("q.dead", "y")
    before = raw.snapshot()
    with pytest.raises(error):
        call(patterns)
    assert raw.snapshot() == before


def test_a_claimed_item_released_with_a_non_error_is_refused(patterns: EtcdPatterns) -> None:
    patterns.enqueue("q", "x")
    with patterns.claim("q") as item, pytest.raises(InvalidTypeError):
        item.release(42)  # type: ignore[arg-type]


# -- faults -------------------------------------------------------------------------------

TXN = "/etcdserverpb.KV/Txn"


def _buries(request: Any) -> bool:
    return any(
        op.HasField("request_put") and b"/q.dead/" in op.request_put.key for op in request.success
    )


def test_dequeue_many_hands_over_what_it_took_when_moving_an_item_aside_is_unsettled(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    injected: list[str] = []

    def plan(method: str, request: Any) -> str:
        if method != TXN:
            return "pass"
        if not injected and _buries(request):
            injected.append("bury")
            return "lose-response"
        if injected and resolves(request):
            return "hold"  # and etcd stays away while the library settles it
        return "pass"

    values = [f"{i:03d}" for i in range(CHUNK)]
    patterns.enqueue_many("q", values)
    raw.put("q/9999-poison", b"\xff")  # behind the first chunk
    client = client_with_faults(etcd.endpoints, FaultInjector(plan))
    with (
        EtcdPatterns(client, namespace=namespace, timeout=1) as faulty,
        pytest.raises(OutcomeUnknownError) as caught,
    ):
        faulty.dequeue_many("q", CHUNK + 1)
    client.close()
    assert injected == ["bury"]
    assert caught.value.taken == values  # taken, and the caller's
    assert raw.count("q/") == 0
    assert raw.value("q.dead/9999-poison") == b"\xff"


def test_a_chained_take_that_took_nothing_is_no_unknown_outcome(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    injected: list[str] = []
    chained = threading.Event()

    def plan(method: str, request: Any) -> str:
        if method != TXN:
            return "pass"
        nests = any(op.HasField("request_txn") for op in request.success)
        if chained.is_set() and not injected and nests:
            injected.append("take")
            return "lose-response"
        return "pass"

    keys = patterns.enqueue_many("q", ["a", "b", "c"])
    client = client_with_faults(etcd.endpoints, FaultInjector(plan))
    with EtcdPatterns(client, namespace=namespace) as faulty:
        assert faulty.dequeue("q", timeout=0) == "a"  # "b" and "c" stay cached
        for key in keys[1:]:
            raw.client.delete(raw.key(key))  # other consumers take them
        patterns.enqueue("q", "d")
        chained.set()
        # The take of "b" or "c" applies and takes nothing; its answer is
        # lost. The commit finds it applied; etcd's history says it took
        # nothing, so the consumer reads again.
        assert faulty.dequeue("q", timeout=5) == "d"
    client.close()
    assert injected == ["take"]


def test_a_last_release_of_an_expired_item_leaves_no_claim(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    key = patterns.enqueue("q", "short-lived", ttl=60)
    with patterns.claim("q", max_deliveries=1) as item:
        raw.revoke(raw.get(key).lease)  # the item's own lease ends, and the item with it
        assert raw.count("q/") == 0
        item.release("too late")
    assert raw.count(".etcd-patterns/claims/") == 0
    assert raw.count("q.dead/") == 0


# -- many consumers -----------------------------------------------------------------------


def test_a_consumer_that_loses_the_head_takes_the_next_in_the_same_round_trip(
    etcd: Etcd, patterns: EtcdPatterns, other: EtcdPatterns
) -> None:
    patterns.enqueue_many("q", [str(i) for i in range(10)])
    assert patterns.dequeue("q", timeout=0) == "0"  # caches the heads behind it
    assert other.dequeue("q", timeout=0) == "1"  # takes this consumer's next head
    with etcd.count_rpcs() as rpcs:
        assert patterns.dequeue("q", timeout=0) == "2"
    assert rpcs.kv == 1
    with patterns.claim("q") as item:  # claims chain the same way
        assert item.value == "3"
    with other.claim("q") as taken:
        assert taken.value == "4"
        with etcd.count_rpcs() as rpcs, patterns.claim("q") as item:
            assert (item.value, item.delivery_count) == ("5", 1)
        assert rpcs.requests["etcdserverpb.KV/Txn"] == 2  # the claim, and its ack


def test_a_read_costs_the_same_however_many_items_are_delayed_behind_it(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    delayed = 40
    patterns.enqueue_many("q", [f"failing-{i}" for i in range(delayed)])
    patterns.enqueue("q", "good")
    for _ in range(delayed):
        with patterns.claim("q", redelivery_delay=MAX_REDELIVERY_DELAY) as item:
            item.release("downstream is down")
    # Orphan records, first in key order, as another tool could leave them.
    records = raw.key(".etcd-patterns/deliveries/") + raw.key("q").hex().encode() + b"/"
    for i in range(20):
        raw.client.put(records + f"0000-{i:020d}-00000000".encode(), b'{"deliveries": 9}')
    with EtcdPatterns.connect(etcd.endpoints, namespace=namespace) as consumer:
        with etcd.count_rpcs() as rpcs:
            assert consumer.dequeue("q", timeout=0) == "good"
        # A read of 16 heads, all delayed, then one further look, and the take.
        assert rpcs.kv == 3
    assert patterns.queue_stats("q").delayed == delayed


def _returned_kvs(response: Any) -> int:
    """How many key-values a transaction's response carries, nested ones included."""
    total = 0
    for op in response.responses:
        if op.HasField("response_range"):
            total += len(op.response_range.kvs)
        elif op.HasField("response_txn"):
            total += _returned_kvs(op.response_txn)
    return total


def test_a_read_returns_no_more_records_than_items_however_many_are_delayed(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns
) -> None:
    delayed = 40
    patterns.enqueue_many("q", [f"failing-{i}" for i in range(delayed)])
    for _ in range(delayed):
        with patterns.claim("q", redelivery_delay=MAX_REDELIVERY_DELAY) as item:
            item.release("downstream is down")
    patterns.enqueue("q", "urgent", priority=-1)
    with EtcdPatterns.connect(etcd.endpoints, namespace=namespace) as consumer:
        transport = consumer._transport
        sent = transport.txn
        returned: list[int] = []

        def txn(*args: Any, **kwargs: Any) -> Any:
            response = sent(*args, **kwargs)
            returned.append(_returned_kvs(response))
            return response

        transport.txn = txn  # type: ignore[method-assign]
        assert consumer.dequeue("q", timeout=0) == "urgent"
    # The read: 16 items and the records of the 15 delayed ones among them,
    # not of all 40; then the take, and the next 16 heads with their records.
    assert returned[0] <= 2 * PREFETCH
    assert sum(returned) <= 4 * PREFETCH


# -- large values ---------------------------------------------------------------------------


def test_large_values_go_fewer_to_a_transaction(
    etcd: Etcd, patterns: EtcdPatterns, raw: Raw
) -> None:
    big = ["x" * 400_000 + str(i) for i in range(4)]  # two would pass half the limit
    with etcd.count_rpcs() as rpcs:
        patterns.enqueue_many("q", big)
    assert rpcs.requests["etcdserverpb.KV/Txn"] == len(big)
    for _ in big:
        with patterns.claim("q", max_deliveries=1, redelivery_delay=0) as item:
            item.release("to the dead letters")
    assert patterns.requeue("q.dead", "q") == len(big)
    assert patterns.dequeue_many("q", 10) == big


def test_a_value_too_large_for_any_request_is_refused_before_anything_is_written(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    before = raw.snapshot()
    with pytest.raises(ValueTooLargeError, match="value 1 has"):
        patterns.enqueue_many("q", ["small", "y" * 2_000_000])
    assert raw.snapshot() == before


def test_records_left_before_the_head_by_another_tool_hide_nothing(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    # Delivery records whose items another tool deleted, more of them than
    # a consumer's furthest look, all sorting before the only item.
    records = raw.key(".etcd-patterns/deliveries/") + raw.key("q").hex().encode() + b"/"
    orphans = [records + f"0000-{i:020d}-00000000".encode() for i in range(FAR + 100)]
    for start in range(0, len(orphans), 100):
        raw.client.transaction(
            compare=[],
            success=[
                raw.client.transactions.put(key, b'{"deliveries": 1}')
                for key in orphans[start : start + 100]
            ],
            failure=[],
        )
    patterns.enqueue("q", "x")
    assert patterns.dequeue("q", timeout=0) == "x"


def test_a_value_just_under_the_limit_is_refused_before_anything_is_written(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    limit = patterns._transport.max_request_bytes
    before = raw.snapshot()
    with pytest.raises(ValueTooLargeError, match="nothing was enqueued"):
        patterns.enqueue_many("q", ["small", "z" * (limit - 600)])
    assert raw.snapshot() == before
