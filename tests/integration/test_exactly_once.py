"""Transforms stay exactly-once when etcd's answer to a write is lost.

Faults are injected into a real client talking to a real etcd: a write is
sent and applied but its answer dropped, or held back and delivered late.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from etcd_patterns import (
    ClosedError,
    EtcdPatterns,
    EtcdUnavailableError,
    OutcomeUnknownError,
    PermissionDeniedError,
    ValueTooLargeError,
)
from etcd_patterns.testing import EtcdCluster, ExternalEtcd
from tests.helpers import FaultInjector, Raw, client_with_faults, run_together

TXN = "/etcdserverpb.KV/Txn"


def incr(value: str) -> str:
    return str(int(value) + 1)


def writes_user_key(method: str, request: Any, namespace: str) -> bool:
    """Whether a request is a transform's commit (not a read, not a resolution)."""
    if method != TXN:
        return False
    return any(
        op.HasField("request_put") and b".etcd-patterns/" not in op.request_put.key
        for op in request.success
    ) and request.success[0].request_put.key.startswith(namespace.encode())


class Faults:
    def __init__(self, namespace: str, actions: list[str]) -> None:
        self.namespace = namespace
        self.actions = actions
        self.injector = FaultInjector(self.plan)
        self.on_fault: list[Any] = []

    def plan(self, method: str, request: Any) -> str:
        if self.actions and writes_user_key(method, request, self.namespace):
            action = self.actions.pop(0)
            if action != "pass":
                self.on_fault.append(request)
            return action
        return "pass"


@pytest.fixture
def faults(namespace: str) -> Iterator[Faults]:
    planned = Faults(namespace, [])
    yield planned
    # A fault test proves nothing unless its faults fired.
    assert planned.actions == [], f"faults never injected: {planned.actions}"


@pytest.fixture
def faulty(
    etcd: EtcdCluster | ExternalEtcd, namespace: str, faults: Faults
) -> Iterator[EtcdPatterns]:
    client = client_with_faults(etcd.endpoints, faults.injector)
    with EtcdPatterns(client, namespace=namespace) as patterns:
        yield patterns
    client.close()


def test_write_applied_but_answer_lost_counts_once(
    faulty: EtcdPatterns, faults: Faults, raw: Raw
) -> None:
    raw.put("n", "0")
    faults.actions = ["lose-response"]
    calls: list[str] = []

    def counted(value: str) -> str:
        calls.append(value)
        return incr(value)

    assert faulty.transform("n", counted) == "1"
    assert raw.value("n") == b"1"
    assert calls == ["0"]
    assert len(faults.on_fault) == 1


def test_write_lost_before_etcd_saw_it_is_sent_again(
    faulty: EtcdPatterns, faults: Faults, raw: Raw
) -> None:
    raw.put("n", "0")
    faults.actions = ["hold"]
    assert faulty.transform("n", incr) == "1"
    assert raw.value("n") == b"1"
    # The lost original now reaches etcd late; the fence keeps it out.
    (late,) = faults.injector.deliver_held()
    assert not late.succeeded
    assert raw.value("n") == b"1"


def test_try_transform_also_resolves(faulty: EtcdPatterns, faults: Faults, raw: Raw) -> None:
    raw.put("n", "5")
    faults.actions = ["lose-response"]
    assert faulty.try_transform("n", incr) == (True, "6")
    faults.actions = ["hold"]
    assert faulty.try_transform("n", incr) == (True, "7")
    assert raw.value("n") == b"7"


@pytest.mark.parametrize("slot", ["fresh", "used before"])
def test_lost_answer_and_lost_lease_is_reported_not_guessed(
    faulty: EtcdPatterns, faults: Faults, raw: Raw, slot: str
) -> None:
    raw.put("n", "0")
    if slot == "used before":
        faulty.transform("other", incr, default="0")  # the slot now holds a token
    faults.actions = ["lose-response"]

    def revoke_session_lease(request: Any) -> None:
        # The write was applied; now the lease, and the evidence on it, vanish.
        raw.revoke(request.success[-1].request_put.lease)

    faults.injector.on_lost_response = revoke_session_lease
    with pytest.raises(OutcomeUnknownError):
        faulty.transform("n", incr)
    assert raw.value("n") == b"1"  # applied: the library said it could not tell, not "failed"
    assert faulty.transform("n", incr) == "2"  # a fresh session carries on


@pytest.mark.parametrize("refusal", ["closed", "permission denied"])
def test_a_refused_resolution_is_an_unknown_outcome_with_the_refusal_as_cause(
    etcd: EtcdCluster | ExternalEtcd, namespace: str, raw: Raw, refusal: str
) -> None:
    # Closing the instance, or losing the right to read the slot, while a
    # write's answer is lost leaves its outcome unknown: it did apply here,
    # so ClosedError or PermissionDeniedError ("this call did nothing")
    # would mislead. The refusal is kept as the cause.
    faults = Faults(namespace, ["lose-response"])
    client = client_with_faults(etcd.endpoints, faults.injector)
    raw.put("n", "0")
    with EtcdPatterns(client, namespace=namespace) as patterns:
        patterns._sessions.get()  # granted before the fault

        def refuse(request: Any) -> None:
            if refusal == "closed":
                client.close()
            else:

                def denied(*args: Any, **kwargs: Any) -> Any:
                    raise PermissionDeniedError("etcdserver: permission denied")

                patterns._transport.txn = denied  # type: ignore[method-assign]

        faults.injector.on_lost_response = refuse
        with pytest.raises(OutcomeUnknownError) as info:
            patterns.transform("n", incr)
        expected = ClosedError if refusal == "closed" else PermissionDeniedError
        assert isinstance(info.value.__cause__, expected)
    assert raw.value("n") == b"1"


def test_try_transform_reports_a_lost_answer_and_a_lost_lease_as_unknown(
    faulty: EtcdPatterns, faults: Faults, raw: Raw
) -> None:
    raw.put("n", "0")
    faults.actions = ["lose-response"]
    faults.injector.on_lost_response = lambda request: raw.revoke(
        request.success[-1].request_put.lease
    )
    with pytest.raises(OutcomeUnknownError):
        faulty.try_transform("n", incr)
    assert faults.actions == []  # the fault fired
    assert raw.value("n") == b"1"  # it had applied: unknown, not failed


@pytest.mark.timeout(120)
def test_counter_exact_under_random_lost_answers(
    faulty: EtcdPatterns, faults: Faults, raw: Raw
) -> None:
    threads, rounds = 4, 25
    chaos = random.Random(7)
    faults.actions = [chaos.choice(["pass", "pass", "lose-response", "hold"]) for _ in range(400)]

    def work() -> None:
        for _ in range(rounds):
            faulty.transform("n", incr, default="0")

    run_together([work] * threads)
    faults.actions.clear()  # a budget of faults, more than the writes need
    assert raw.value("n") == str(threads * rounds).encode()
    held = faults.injector.deliver_held()
    assert held  # some writes were held back, and delivered late here
    assert len(faults.on_fault) > len(held)  # and some answers were lost
    assert not any(response.succeeded for response in held)
    assert raw.value("n") == str(threads * rounds).encode()
    print(f"faults injected: {len(faults.on_fault)}, late deliveries rejected: {len(held)}")


def is_resolution(request: Any) -> bool:
    """The transaction that settles a write whose answer was lost."""
    return (
        len(request.compare) == 1
        and len(request.success) == 1
        and request.success[0].HasField("request_range")
        and b".etcd-patterns/slots/" in request.success[0].request_range.key
    )


def test_a_late_copy_of_a_resolution_changes_nothing(
    faulty: EtcdPatterns, faults: Faults, raw: Raw
) -> None:
    raw.put("n", "0")
    steps: list[tuple[Callable[[str, Any], bool], str]] = [
        (lambda m, r: writes_user_key(m, r, faults.namespace), "lose-response"),
        (lambda m, r: m == TXN and is_resolution(r), "hold"),  # retried, and delivered later
    ]

    def plan(method: str, request: Any) -> str:
        if steps and steps[0][0](method, request):
            return steps.pop(0)[1]
        return "pass"

    faults.injector.plan = plan
    assert faulty.transform("n", incr) == "1"
    assert steps == []
    # The next write on the same slot loses its answer too; before it is
    # settled, the first resolution's lost copy finally reaches etcd.
    steps.append((lambda m, r: writes_user_key(m, r, faults.namespace), "lose-response"))

    def deliver_the_late_copy(_: Any) -> None:
        faults.injector.deliver_held()

    faults.injector.on_lost_response = deliver_the_late_copy
    assert faulty.transform("n", incr) == "2"
    assert raw.value("n") == b"2"


@pytest.mark.timeout(60)
def test_one_timeout_bounds_a_write_its_resolutions_and_its_rounds(
    etcd: EtcdCluster | ExternalEtcd, namespace: str, raw: Raw
) -> None:
    # Every write hangs for as long as one attempt may take (a third of the
    # timeout, the transport's cap), then its answer is lost; each is settled
    # (fenced) and tried again. The call must give up within its timeout,
    # not after eight such rounds.
    timeout = 1.0
    attempt_cap = timeout / 3
    events: list[str] = []
    armed: list[bool] = []

    def plan(method: str, request: Any) -> str:
        if not armed or method != TXN:
            return "pass"
        if not any(op.HasField("request_put") for op in request.success):
            return "pass"
        if any(b".etcd-patterns/slots/" in op.request_put.key for op in request.success[:-1]):
            return "pass"  # not the write: a fence, which settles it
        events.append("write")
        time.sleep(attempt_cap)  # a slow etcd, not a wait for another thread
        return "hold"

    client = client_with_faults(etcd.endpoints, FaultInjector(plan))
    with EtcdPatterns(client, namespace=namespace, timeout=timeout) as faulty:
        faulty.try_transform("other", lambda v: v, default="")  # grants the session's lease
        armed.append(True)
        started = time.monotonic()
        with pytest.raises((EtcdUnavailableError, OutcomeUnknownError)):
            faulty.transform("k", incr, default="0")
        elapsed = time.monotonic() - started
    client.close()
    assert len(events) >= 2  # rounds did follow one another
    assert elapsed < timeout + attempt_cap
    assert raw.value("k") is None


def test_writes_refused_before_sending_leave_no_bookkeeping_behind(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    patterns.transform("k", incr, default="0")
    assert raw.count(".etcd-patterns/slots/") == 1
    huge = "x" * (2 * 1024 * 1024)  # beyond etcd's default request limit
    for _ in range(5):
        with pytest.raises(ValueTooLargeError):
            patterns.transform("k", lambda _: huge)
    patterns.transform("k", incr)
    # Nothing was sent, so the slot stays in use: one key, not one per refusal.
    assert raw.count(".etcd-patterns/slots/") == 1
