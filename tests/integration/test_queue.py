"""enqueue / dequeue / claim against a real etcd."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import etcd_patterns._wait as wait_module
from etcd_patterns import (
    ClaimLostError,
    EtcdError,
    EtcdPatterns,
    Fence,
    LeaseNotFoundError,
    NotAValueError,
    OutcomeUnknownError,
    QueueEmptyError,
    ValueDecodeError,
)
from etcd_patterns._queue import CHUNK
from etcd_patterns.testing import EtcdCluster, ExternalEtcd
from tests.helpers import (
    SCHEDULING_GRACE,
    FaultInjector,
    Raw,
    client_with_faults,
    freed_within,
    resolves,
    wait_until,
)

Etcd = EtcdCluster | ExternalEtcd


# -- order and layout -------------------------------------------------------------


def test_fifo_for_a_single_consumer(patterns: EtcdPatterns) -> None:
    values = [f"item-{i}" for i in range(200)]
    for value in values[:50]:
        patterns.enqueue("q", value)
    patterns.enqueue_many("q", values[50:])
    assert [patterns.dequeue("q", timeout=0) for _ in values] == values
    with pytest.raises(QueueEmptyError):
        patterns.dequeue("q", timeout=0)


def test_items_are_direct_children_listed_in_order(patterns: EtcdPatterns, raw: Raw) -> None:
    keys = [patterns.enqueue("q", v) for v in ("a", "b", "c")]
    assert all(key.startswith("q/") and key.count("/") == 1 for key in keys)
    assert keys == sorted(keys)
    assert patterns.get_values("q") == ["a", "b", "c"]
    raw.put("q/deeper/key", "not an item")
    with patterns.claim("q") as item:
        assert item.value == "a"
        assert patterns.get_values("q") == ["a", "b", "c"]  # claims are kept elsewhere
    assert [patterns.dequeue("q", timeout=0) for _ in range(2)] == ["b", "c"]
    with pytest.raises(QueueEmptyError):
        patterns.dequeue("q", timeout=0)


def test_dequeue_many(patterns: EtcdPatterns) -> None:
    patterns.enqueue_many("q", [str(i) for i in range(150)])
    assert patterns.dequeue_many("q", 1) == ["0"]
    assert patterns.dequeue_many("q", 100) == [str(i) for i in range(1, 101)]
    assert patterns.dequeue_many("q", 100, timeout=0) == [str(i) for i in range(101, 150)]
    with pytest.raises(QueueEmptyError):
        patterns.dequeue_many("q", 5, timeout=0)


def test_a_dir_key_holding_a_value_is_refused(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("q", "a value")
    before = raw.revision()
    with pytest.raises(NotAValueError):
        patterns.enqueue("q", "x")
    with pytest.raises(NotAValueError):
        patterns.dequeue("q", timeout=0)
    assert raw.revision() == before


def test_an_undecodable_head_goes_to_the_dead_letters(
    patterns: EtcdPatterns, raw: Raw, caplog: pytest.LogCaptureFixture
) -> None:
    raw.put("q/0001", b"\xff")
    patterns.enqueue("q", "good")
    assert patterns.dequeue("q", timeout=0) == "good"
    assert raw.value("q/0001") is None
    assert raw.value("q.dead/0001") == b"\xff"
    assert "not UTF-8" in caplog.text
    (dead,) = patterns.peek("q.dead")
    assert (dead.value, dead.value_bytes, dead.reason) == (None, b"\xff", "the value is not UTF-8")
    with pytest.raises(QueueEmptyError):
        patterns.dequeue("q", timeout=0)


def test_bytes_mode_delivers_any_value(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("q/0001", b"\xff")
    patterns.enqueue("q", "good")
    assert patterns.dequeue("q", timeout=0, decode=False) == b"\xff"
    assert patterns.dequeue_many("q", 5, decode=False) == [b"good"]
    raw.put("q/0001", b"\xfe")
    with patterns.claim("q", decode=False) as item:
        assert item.value_bytes == b"\xfe"
        with pytest.raises(ValueDecodeError):
            item.value  # noqa: B018 - the property raises
    assert raw.count("q") == 0


# -- blocking -------------------------------------------------------------------


def test_timeouts(patterns: EtcdPatterns) -> None:
    streams: list[object] = []
    original = patterns._transport.watch

    def watch(*args: Any, **kwargs: Any) -> Any:
        streams.append(args)
        return original(*args, **kwargs)

    patterns._transport.watch = watch  # type: ignore[method-assign]
    read = patterns._transport.timeout  # the most one read may take
    started = time.monotonic()
    with pytest.raises(QueueEmptyError) as info:
        patterns.dequeue("q", timeout=0)
    assert time.monotonic() - started < read + SCHEDULING_GRACE
    assert streams == []  # timeout=0: one read, no wait
    assert isinstance(info.value, TimeoutError)
    started = time.monotonic()
    with pytest.raises(QueueEmptyError):
        patterns.dequeue("q", timeout=0.5)
    waited = time.monotonic() - started
    assert len(streams) == 1  # it did wait, on a watch
    # The wait, then at most the read that ends it.
    assert 0.5 <= waited < 0.5 + read + SCHEDULING_GRACE


@pytest.mark.timeout(120)
def test_a_blocked_dequeue_wakes_on_enqueue(
    patterns: EtcdPatterns, other: EtcdPatterns, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No re-read can come before the dequeue's own timeout: only the watch
    # can wake the consumer.
    wait_for = 20.0
    monkeypatch.setattr(wait_module, "RECHECK_INTERVAL", 3 * wait_for)
    latencies = []

    def receive(into: list[tuple[str, float]]) -> None:
        into.append((other.dequeue("q", timeout=wait_for), time.monotonic()))

    for i in range(20):
        received: list[tuple[str, float]] = []
        waiter = threading.Thread(target=receive, args=(received,))
        waiter.start()
        # Enqueue only once the consumer is blocked on its watch.
        wait_until(partial(_watching, waiter))
        sent = time.monotonic()
        patterns.enqueue("q", f"v{i}")
        waiter.join(timeout=wait_for + 10)
        assert received[0][0] == f"v{i}"
        latencies.append(received[0][1] - sent)
    print(f"dequeue wake-up after enqueue: p50 {statistics.median(latencies) * 1000:.1f} ms")


def _watching(thread: threading.Thread) -> bool:
    """Whether ``thread`` is blocked in a watch of the wait loop."""
    frame: FrameType | None = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == "_watch_once":
            return True
        frame = frame.f_back
    return False


# -- ttl ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_an_item_with_a_ttl_expires_undelivered(patterns: EtcdPatterns, raw: Raw) -> None:
    patterns.enqueue("q", "short-lived", ttl=1)
    patterns.enqueue("q", "lasting")
    assert raw.count("q/") == 2
    wait_until(lambda: raw.count("q/") == 1, timeout=15)
    assert patterns.dequeue("q", timeout=0) == "lasting"
    with pytest.raises(QueueEmptyError):
        patterns.dequeue("q", timeout=0)


# -- exactly once, under load and under faults ------------------------------------


def _producer(endpoints: list[str], namespace: str, name: str, count: int, start: Any) -> None:
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd:
        start.wait(timeout=60)
        for i in range(count):
            etcd.enqueue("q", f"{name}:{i}")


def _consumer(
    endpoints: list[str], namespace: str, out: str, start: Any, producers_done: Any
) -> None:
    received = []
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd:
        start.wait(timeout=60)
        while True:
            try:
                received.append(etcd.dequeue("q", timeout=1))
            except QueueEmptyError:
                if producers_done.is_set():
                    break
    Path(out).write_text("\n".join(received))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_every_item_exactly_once_across_processes(
    etcd: Etcd, namespace: str, raw: Raw, tmp_path: Path
) -> None:
    producers, consumers, count = 3, 3, 300
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(producers + consumers)
    producers_done = context.Event()
    outs = [str(tmp_path / f"consumer{i}.txt") for i in range(consumers)]
    consuming = [
        context.Process(
            target=_consumer, args=(etcd.endpoints, namespace, out, start, producers_done)
        )
        for out in outs
    ]
    producing = [
        context.Process(target=_producer, args=(etcd.endpoints, namespace, f"p{i}", count, start))
        for i in range(producers)
    ]
    for process in consuming + producing:
        process.start()
    for process in producing:
        process.join(timeout=200)
    producers_done.set()
    for process in consuming:
        process.join(timeout=200)
    assert [p.exitcode for p in producing + consuming] == [0] * (producers + consumers)

    per_consumer = [Path(out).read_text().split("\n") for out in outs]
    received = [item for items in per_consumer for item in items if item]
    expected = {f"p{p}:{i}" for p in range(producers) for i in range(count)}
    lost = expected - set(received)
    duplicated = len(received) - len(set(received))
    print(
        f"received {len(received)} of {len(expected)}; lost {len(lost)}, duplicated {duplicated}; "
        f"per consumer {[len(items) for items in per_consumer]}"
    )
    assert lost == set()
    assert duplicated == 0
    assert raw.count("q/") == 0
    for items in per_consumer:  # each producer's items in that producer's order
        for p in range(producers):
            seqs = [int(i.split(":")[1]) for i in items if i.startswith(f"p{p}:")]
            assert seqs == sorted(seqs)


TXN = "/etcdserverpb.KV/Txn"


def _operations(request: Any) -> Iterator[Any]:
    """A transaction's operations, those of the transactions nested in it included."""
    for op in [*request.success, *request.failure]:
        yield op
        if op.HasField("request_txn"):
            yield from _operations(op.request_txn)


def _takes_an_item(request: Any) -> bool:
    return any(
        op.HasField("request_delete_range") and b"/q/" in op.request_delete_range.key
        for op in _operations(request)
    )


class OneFault:
    def __init__(self, action: str) -> None:
        self.action = action
        self.injected = 0

    def __call__(self, method: str, request: Any) -> str:
        if method == TXN and self.injected == 0 and _takes_an_item(request):
            self.injected += 1
            return self.action
        return "pass"


@pytest.mark.parametrize("action", ["lose-response", "hold"])
def test_a_lost_answer_to_the_take_delivers_exactly_once(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw, action: str
) -> None:
    fault = OneFault(action)
    injector = FaultInjector(fault)
    client = client_with_faults(etcd.endpoints, injector)
    patterns.enqueue_many("q", ["first", "second"])
    with EtcdPatterns(client, namespace=namespace) as faulty:
        assert faulty.dequeue("q", timeout=0) == "first"
        assert fault.injected == 1
        late = injector.deliver_held()
        assert not any(response.succeeded for response in late)
        assert faulty.dequeue("q", timeout=0) == "second"
        with pytest.raises(QueueEmptyError):
            faulty.dequeue("q", timeout=0)
    client.close()
    assert raw.count("q/") == 0


def _enqueues(request: Any) -> bool:
    return any(
        op.HasField("request_put") and b"/q/" in op.request_put.key for op in request.success
    )


@pytest.mark.parametrize("action", ["lose-response", "hold"])
@pytest.mark.parametrize("count", [1, CHUNK + 5])
def test_a_lost_answer_to_an_enqueue_enqueues_exactly_once(
    etcd: Etcd, namespace: str, raw: Raw, action: str, count: int
) -> None:
    injected: list[Any] = []

    def plan(method: str, request: Any) -> str:
        if method == TXN and not injected and _enqueues(request):
            injected.append(request)
            return action
        return "pass"

    injector = FaultInjector(plan)
    client = client_with_faults(etcd.endpoints, injector)
    values = [f"{i:03d}" for i in range(count)]
    with EtcdPatterns(client, namespace=namespace) as faulty:
        keys = faulty.enqueue_many("q", values)
        assert len(injected) == 1  # the fault fired
        late = injector.deliver_held()
        assert len(late) == (1 if action == "hold" else 0)
        assert not any(response.succeeded for response in late)  # shut out
        assert len(set(keys)) == count
        assert raw.count("q/") == count  # each value once
        assert faulty.dequeue_many("q", count) == values
    client.close()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_blocked_dequeue_survives_an_etcd_restart(namespace: str) -> None:
    with (
        EtcdCluster() as cluster,
        EtcdPatterns.connect(cluster.endpoints, namespace=namespace, timeout=10) as consumer,
        EtcdPatterns.connect(cluster.endpoints, namespace=namespace) as producer,
    ):
        received: list[str] = []
        waiter = threading.Thread(target=lambda: received.append(consumer.dequeue("q", timeout=40)))
        waiter.start()
        wait_until(lambda: _watching(waiter))
        cluster.nodes[0].restart()
        producer.enqueue("q", "after the restart")
        waiter.join(timeout=40)
        assert received == ["after the restart"]


# -- claim / ack ----------------------------------------------------------------


def test_ack_removes_the_item(patterns: EtcdPatterns, raw: Raw) -> None:
    patterns.enqueue_many("q", ["a", "b"])
    with patterns.claim("q") as item:
        assert item.value == "a"
        assert item.key.startswith("q/")
        assert not item.lost.is_set()
    assert patterns.get_values("q") == ["b"]
    assert raw.count(".etcd-patterns/claims/") == 0


def test_an_exception_returns_the_item_to_its_place(patterns: EtcdPatterns) -> None:
    patterns.enqueue_many("q", ["a", "b"])
    seen: list[str] = []

    def process() -> None:
        with patterns.claim("q", redelivery_delay=0) as item:
            seen.append(item.value)
            raise RuntimeError("processing failed")

    with pytest.raises(RuntimeError, match="processing failed"):
        process()
    assert seen == ["a"]
    assert patterns.dequeue("q", timeout=0) == "a"
    assert patterns.dequeue("q", timeout=0) == "b"


def test_a_claimed_item_is_invisible_to_others(patterns: EtcdPatterns, other: EtcdPatterns) -> None:
    patterns.enqueue("q", "only")
    with patterns.claim("q") as item:
        assert item.value == "only"
        with pytest.raises(QueueEmptyError):
            other.dequeue("q", timeout=0)
        with pytest.raises(QueueEmptyError), other.claim("q", timeout=0):
            pass
    with pytest.raises(QueueEmptyError):
        other.dequeue("q", timeout=0)


def test_a_released_claim_wakes_a_waiting_consumer(
    patterns: EtcdPatterns, other: EtcdPatterns
) -> None:
    patterns.enqueue("q", "retry me")
    received: list[str] = []
    waiter = threading.Thread(target=lambda: received.append(other.dequeue("q", timeout=30)))
    claiming = patterns.claim("q")
    claiming.__enter__()
    waiter.start()
    wait_until(lambda: _watching(waiter))
    claiming.__exit__(RuntimeError, RuntimeError("give it back"), None)
    waiter.join(timeout=30)
    assert received == ["retry me"]


def test_a_claim_is_a_fence_for_guarded_writes(
    patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    patterns.enqueue("q", "job")
    raw.put("result", "before")
    claiming = patterns.claim("q", ttl=3)
    item = claiming.__enter__()
    assert isinstance(item, Fence)
    assert item.is_owner()
    assert patterns.transform("result", lambda v: "by the claimer", guard=item) == "by the claimer"
    raw.revoke(item.lease_id)  # the claimer's lease is lost: so is its claim
    assert item.lost.wait(timeout=10)
    assert not item.is_owner()
    with other.claim("q", timeout=5) as again:
        assert again.fencing_token > item.fencing_token
        with pytest.raises(ClaimLostError, match="'result' was not written"):
            patterns.transform("result", lambda v: "stale", guard=item)
        with pytest.raises(ClaimLostError):
            patterns.try_transform("result", lambda v: "stale", guard=item)
        assert raw.value("result") == b"by the claimer"
        assert other.transform("result", lambda v: "by the new claimer", guard=again)
    with pytest.raises(ClaimLostError):
        claiming.__exit__(None, None, None)
    assert raw.value("result") == b"by the new claimer"


def test_an_expired_claim_cannot_ack(patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw) -> None:
    patterns.enqueue("q", "job")
    claiming = patterns.claim("q", ttl=3)
    item = claiming.__enter__()
    claims = raw.client.get_prefix(raw.key(".etcd-patterns/claims/"))
    ((_, meta),) = list(claims)
    raw.revoke(meta.lease_id)  # the claimer's lease is lost
    assert item.lost.wait(timeout=10)
    with other.claim("q", timeout=5) as again:  # another consumer gets the item
        assert again.value == "job"
        assert again.fencing_token > item.fencing_token
        with pytest.raises(ClaimLostError):
            claiming.__exit__(None, None, None)
        assert raw.count("q/") == 1  # the stale ack removed nothing
    assert raw.count("q/") == 0


def _claim_and_hang(endpoints: list[str], namespace: str, ttl: int, ready: Any) -> None:
    etcd = EtcdPatterns.connect(endpoints, namespace=namespace)
    etcd.claim("q", ttl=ttl).__enter__()
    ready.set()
    threading.Event().wait()  # until SIGKILL


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_killed_consumers_item_comes_back_within_ttl(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns
) -> None:
    ttl = 2
    patterns.enqueue("q", "job")
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    consumer = context.Process(target=_claim_and_hang, args=(etcd.endpoints, namespace, ttl, ready))
    consumer.start()
    try:
        assert ready.wait(timeout=30)
        with pytest.raises(QueueEmptyError):
            patterns.dequeue("q", timeout=0)
        os.kill(consumer.pid or 0, signal.SIGKILL)
        killed = time.monotonic()
        assert patterns.dequeue("q", timeout=ttl + 10) == "job"
        waited = time.monotonic() - killed
    finally:
        consumer.kill()
        consumer.join()
    print(f"claimed item back {waited:.2f}s after SIGKILL (ttl={ttl}s)")
    assert waited <= freed_within(ttl)


# -- cost -----------------------------------------------------------------------


def test_cost_in_round_trips(etcd: Etcd, patterns: EtcdPatterns) -> None:
    patterns.enqueue("warm-up", "x")  # the session lease is granted once, on first use
    with etcd.count_rpcs() as rpcs:
        patterns.enqueue("q", "x")
    assert rpcs.requests == {"etcdserverpb.KV/Txn": 1}
    with etcd.count_rpcs() as rpcs:
        patterns.dequeue("q", timeout=0)
    assert 1 <= rpcs.kv <= 2
    patterns.enqueue_many("q", [str(i) for i in range(100)])
    with etcd.count_rpcs() as rpcs:
        for _ in range(100):
            patterns.dequeue("q", timeout=0)
    per_item = rpcs.kv / 100
    print(f"amortised dequeue: {per_item:.2f} round trips per item")
    assert 1 <= per_item <= 1.2


def _claims(request: Any) -> bool:
    return any(
        op.HasField("request_put") and b"/claims/" in op.request_put.key
        for op in _operations(request)
    )


def _acks(request: Any) -> bool:
    return any(
        op.HasField("request_delete_range") and b"/claims/" in op.request_delete_range.key
        for op in request.success
    ) and any(
        op.HasField("request_delete_range") and b"/q/" in op.request_delete_range.key
        for op in request.success
    )


@pytest.mark.parametrize("step", ["claim", "ack"])
@pytest.mark.parametrize("action", ["lose-response", "hold"])
def test_lost_answers_in_claim_and_ack(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw, step: str, action: str
) -> None:
    injected: list[str] = []

    def plan(method: str, request: Any) -> str:
        chosen = _claims if step == "claim" else _acks
        if method == TXN and not injected and chosen(request):
            injected.append(step)
            return action
        return "pass"

    injector = FaultInjector(plan)
    client = client_with_faults(etcd.endpoints, injector)
    patterns.enqueue_many("q", ["first", "second"])
    with EtcdPatterns(client, namespace=namespace) as faulty:
        with faulty.claim("q", timeout=0) as item:
            assert item.value == "first"
            assert raw.count(".etcd-patterns/claims/") == 1  # one claim, not two
        assert injected == [step]
        assert not any(response.succeeded for response in injector.deliver_held())
        assert raw.count(".etcd-patterns/claims/") == 0
        assert faulty.get_values("q") == ["second"]
    client.close()


def _interrupt(_request: Any) -> None:
    raise KeyboardInterrupt


@pytest.mark.timeout(60)
def test_an_ack_that_cannot_be_settled_lets_the_item_go(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns
) -> None:
    # The ack never reaches etcd, and etcd stays away while the library
    # tries to settle it: the ack raises OutcomeUnknownError. The claim must
    # not live on with the process, hiding the item from every consumer.
    away = threading.Event()
    away.set()
    injected: list[str] = []

    def plan(method: str, request: Any) -> str:
        if method != TXN:
            return "pass"
        if not injected and _acks(request):
            injected.append("ack")
            return "hold"
        if injected and away.is_set() and resolves(request):
            injected.append("resolution")
            return "hold"
        return "pass"

    injector = FaultInjector(plan)
    client = client_with_faults(etcd.endpoints, injector)
    patterns.enqueue("q", "job")
    ttl = 2
    with EtcdPatterns(client, namespace=namespace, timeout=1, session_ttl=ttl) as faulty:
        claiming = faulty.claim("q", timeout=0)
        assert claiming.__enter__().value == "job"
        with pytest.raises(OutcomeUnknownError):
            claiming.__exit__(None, None, None)
        assert injected[:2] == ["ack", "resolution"]
        away.clear()
        # Offered again once etcd answers: the session deletes the claim at
        # its next refresh, a third of the TTL later.
        assert patterns.dequeue("q", timeout=ttl) == "job"
        # A late copy of the ack finds the claim gone and changes nothing.
        assert not any(response.succeeded for response in injector.deliver_held())
    client.close()


def test_ctrl_c_once_etcd_applied_a_claim_leaves_the_item_available(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    injected: list[str] = []

    def plan(method: str, request: Any) -> str:
        if method == TXN and not injected and _claims(request):
            injected.append("claim")
            return "lose-response"
        return "pass"

    injector = FaultInjector(plan)
    injector.on_lost_response = _interrupt
    client = client_with_faults(etcd.endpoints, injector)
    patterns.enqueue("q", "job")
    with EtcdPatterns(client, namespace=namespace) as faulty:
        claiming = faulty.claim("q", timeout=0)
        with pytest.raises(KeyboardInterrupt):
            claiming.__enter__()
        assert injected == ["claim"]
        assert raw.count(".etcd-patterns/claims/") == 0
        assert patterns.dequeue("q", timeout=0) == "job"
    client.close()


def test_dequeue_many_reports_a_take_it_could_not_settle(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    takes: list[str] = []

    def plan(method: str, request: Any) -> str:
        if method != TXN:
            return "pass"
        if _takes_an_item(request):
            takes.append("take")
            if len(takes) == 2:
                return "lose-response"  # etcd applies the second take; its answer is lost
        if len(takes) >= 2 and resolves(request):
            return "hold"  # and etcd stays away while the library tries to settle it
        return "pass"

    client = client_with_faults(etcd.endpoints, FaultInjector(plan))
    values = [f"{i:03d}" for i in range(CHUNK + 2)]
    patterns.enqueue_many("q", values)
    # The first take is a whole chunk; the last two items follow in a second.
    with (
        EtcdPatterns(client, namespace=namespace, timeout=1) as faulty,
        pytest.raises(OutcomeUnknownError) as caught,
    ):
        faulty.dequeue_many("q", len(values))
    client.close()
    assert takes == ["take", "take"]
    assert caught.value.taken == values[:CHUNK]
    assert caught.value.uncertain == values[CHUNK:]
    assert raw.count("q/") == 0  # all of them left the queue, and none went unreported


def test_dequeue_many_moves_a_bad_item_aside_and_serves_the_rest(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    patterns.enqueue_many("q", [str(i) for i in range(5)])
    raw.put("q/0999-bad", b"\xff")  # first in line, not UTF-8
    patterns.enqueue_many("q", [str(i) for i in range(5, 10)])
    assert patterns.dequeue_many("q", 20) == [str(i) for i in range(10)]
    assert raw.count("q/") == 0
    assert raw.value("q.dead/0999-bad") == b"\xff"


def test_dequeue_many_keeps_what_it_took_when_etcd_fails_midway(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    took: list[int] = []
    refused: list[int] = []

    def plan(method: str, request: Any) -> str:
        if method != TXN:
            return "pass"
        if _takes_an_item(request):
            if took:
                refused.append(1)
                return "hold"  # every take after the first is lost on its way
            took.append(1)
        return "pass"

    # More items than one transaction takes, so that taking them needs two.
    items = [f"{i:03d}" for i in range(CHUNK + 8)]
    client = client_with_faults(etcd.endpoints, FaultInjector(plan))
    patterns.enqueue_many("q", items)
    with EtcdPatterns(client, namespace=namespace, timeout=1) as faulty:
        assert faulty.dequeue_many("q", len(items)) == items[:CHUNK]
    client.close()
    assert took == [1]
    assert refused  # the fault fired
    assert raw.count("q/") == len(items) - CHUNK


def test_an_items_expired_lease_is_not_blamed_on_the_session(
    etcd: Etcd, namespace: str, raw: Raw
) -> None:
    def plan(method: str, request: Any) -> str:
        if method == TXN:
            for op in request.success:
                if op.HasField("request_put") and b"/q/" in op.request_put.key:
                    raw.revoke(op.request_put.lease)  # the item's ttl runs out first
                    break
        return "pass"

    client = client_with_faults(etcd.endpoints, FaultInjector(plan))
    with EtcdPatterns(client, namespace=namespace) as faulty, faulty.locked("L") as held:
        with pytest.raises(LeaseNotFoundError, match="nothing was written"):
            faulty.enqueue("q", "short-lived", ttl=5)
        assert not held.lost.is_set()
        assert held.is_owner()
    client.close()
    assert raw.count("q/") == 0


def test_without_prefetch_each_take_reads_the_next_head(etcd: Etcd, namespace: str) -> None:
    with EtcdPatterns.connect(etcd.endpoints, namespace=namespace, prefetch=1) as etcd_one:
        etcd_one.enqueue_many("q", [str(i) for i in range(10)])
        with etcd.count_rpcs() as rpcs:
            taken = [etcd_one.dequeue("q", timeout=0) for _ in range(10)]
    assert taken == [str(i) for i in range(10)]
    # One read, then each take reads the next head in its own transaction.
    assert rpcs.kv == 11


def test_an_enqueue_whose_generated_key_is_taken_draws_another(
    patterns: EtcdPatterns, raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw.put("q/taken", "someone else's")
    queue = patterns._queue
    fresh = queue._new_id
    names = iter([b"taken"])
    monkeypatch.setattr(queue, "_new_id", lambda priority=0: next(names, None) or fresh(priority))
    key = patterns.enqueue("q", "mine")
    assert key != "q/taken"
    assert raw.value("q/taken") == b"someone else's"
    assert raw.value(key) == b"mine"


def test_an_enqueue_whose_generated_keys_are_always_taken_fails_clearly(
    patterns: EtcdPatterns, raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw.put("q/taken", "someone else's")
    monkeypatch.setattr(patterns._queue, "_new_id", lambda priority=0: b"taken")
    with pytest.raises(EtcdError, match="not enqueued"):
        patterns.enqueue("q", "mine")
    assert raw.count("q/") == 1


def test_enqueue_many_that_fails_midway_says_what_was_enqueued(
    patterns: EtcdPatterns, raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw.put("q/taken", "someone else's")
    queue = patterns._queue
    fresh = queue._new_id
    drawn = itertools.count()
    rest = 10

    def new_id(priority: int = 0) -> bytes:
        # The first chunk's keys are free; in every set drawn for the second
        # chunk, the first key is taken.
        n = next(drawn)
        return b"taken" if n >= CHUNK and (n - CHUNK) % rest == 0 else fresh(priority)

    monkeypatch.setattr(queue, "_new_id", new_id)
    values = [f"{i:03d}" for i in range(CHUNK + rest)]
    with pytest.raises(EtcdError, match="not enqueued") as info:
        patterns.enqueue_many("q", values)
    (note,) = info.value.__notes__
    assert f"the first {CHUNK} of {len(values)} values were enqueued" in note
    assert raw.count("q/") == CHUNK + 1  # the first chunk, and the other writer's key
    assert patterns.dequeue_many("q", CHUNK + 1) == [*values[:CHUNK], "someone else's"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeout", [0, 0.5])
def test_a_consumer_that_keeps_losing_races_gives_up_in_time(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw, timeout: float
) -> None:
    # Another consumer gets to every head first (here: it touches the item
    # just before our take arrives, so that the take's compare fails). The
    # items stay there, so the queue never looks empty.
    lost: list[str] = []
    interfere = 500  # then stop, so that a consumer that never gives up succeeds

    def plan(method: str, request: Any) -> str:
        if method == TXN and _takes_an_item(request) and len(lost) < interfere:
            for op in _operations(request):  # every item a chained take tries
                key = op.request_delete_range.key
                if op.HasField("request_delete_range") and b"/q/" in key:
                    raw.client.put(key, b"touched")
            lost.append("take")
        return "pass"

    client = client_with_faults(etcd.endpoints, FaultInjector(plan))
    patterns.enqueue_many("q", ["a", "b", "c"])
    request_timeout = 5.0
    with EtcdPatterns(client, namespace=namespace, timeout=request_timeout) as faulty:
        started = time.monotonic()
        with pytest.raises(QueueEmptyError, match="took every item first"):
            faulty.dequeue("q", timeout=timeout)
        elapsed = time.monotonic() - started
    client.close()
    assert lost  # it did lose races
    assert len(lost) < interfere
    # The deadline is checked before each take: at most one take past it.
    assert elapsed < timeout + request_timeout
    assert raw.count("q/") == 3


def test_a_batch_that_lost_a_race_does_not_skip_older_items(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    keys = patterns.enqueue_many("q", [str(i) for i in range(10)])
    assert patterns.dequeue("q") == "0"  # caches the heads behind it
    raw.client.delete(raw.key(keys[3]))  # another consumer takes "3"
    # The batch "1", "2", "3" fails; "1" and "2" are still the oldest.
    assert patterns.dequeue_many("q", 3) == ["1", "2", "4"]
    assert patterns.dequeue_many("q", 10) == ["5", "6", "7", "8", "9"]


@pytest.mark.timeout(60)
def test_cleaning_up_a_failed_claim_never_deletes_a_later_claim_on_the_item(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    # A claim attempt fails with its outcome unknown (its answer and its
    # settling are lost), so its claim key is handed to the session to
    # delete. The same consumer then claims the same item again, on the same
    # lease. The cleanup must leave that new claim alone.
    away = threading.Event()
    away.set()

    def plan(method: str, request: Any) -> str:
        if method == TXN and away.is_set() and (_claims(request) or resolves(request)):
            return "hold"
        return "pass"

    client = client_with_faults(etcd.endpoints, FaultInjector(plan))
    patterns.enqueue("q", "job")
    with EtcdPatterns(client, namespace=namespace, timeout=1, session_ttl=2) as faulty:
        with pytest.raises(OutcomeUnknownError):
            faulty.claim("q", timeout=0).__enter__()
        away.clear()
        claiming = faulty.claim("q", timeout=5)
        item = claiming.__enter__()
        session = item._session
        wait_until(lambda: not session._janitor.pending)  # the janitor has run
        assert raw.count(".etcd-patterns/claims/") == 1  # the new claim is still there
        claiming.__exit__(None, None, None)  # and acks: no ClaimLostError
    client.close()
    assert raw.count("q/") == 0
