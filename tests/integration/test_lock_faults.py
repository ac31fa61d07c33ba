"""Locks stay correct when etcd's answers are lost or etcd goes away."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import etcd3
import pytest
from etcd3 import etcdrpc

from etcd_patterns import EtcdPatterns, OutcomeUnknownError
from etcd_patterns.testing import EtcdCluster, ExternalEtcd
from tests.helpers import (
    FaultInjector,
    LostResponse,
    Raw,
    client_with_faults,
    resolves,
    wait_until,
)

TXN = "/etcdserverpb.KV/Txn"


def touches_lock(request: Any, op: str) -> bool:
    """Whether a Txn's success branch puts or deletes a contender key of lock L."""
    for item in request.success:
        if item.HasField(op):
            key = getattr(item, op).key
            if b"/L/" in key:
                return True
    return False


class Plan:
    def __init__(self) -> None:
        self.lose: dict[str, int] = {}
        self.lost: list[str] = []
        self.action = "lose-response"

    def __call__(self, method: str, request: Any) -> str:
        if method != TXN:
            return "pass"
        for op, field in (("put", "request_put"), ("delete", "request_delete_range")):
            if self.lose.get(op) and touches_lock(request, field):
                self.lose[op] -= 1
                self.lost.append(op)
                return self.action
        return "pass"


@pytest.fixture
def plan() -> Plan:
    return Plan()


@pytest.fixture
def injector(plan: Plan) -> FaultInjector:
    return FaultInjector(plan)


@pytest.fixture
def faulty(
    etcd: EtcdCluster | ExternalEtcd, namespace: str, injector: FaultInjector
) -> Iterator[EtcdPatterns]:
    client = client_with_faults(etcd.endpoints, injector)
    with EtcdPatterns(client, namespace=namespace) as patterns:
        yield patterns
    client.close()


@pytest.fixture
def hasty(
    etcd: EtcdCluster | ExternalEtcd, namespace: str, injector: FaultInjector
) -> Iterator[EtcdPatterns]:
    """As `faulty`, with a 1 s timeout: the tests that use it run into it on purpose."""
    client = client_with_faults(etcd.endpoints, injector)
    with EtcdPatterns(client, namespace=namespace, timeout=1) as patterns:
        yield patterns
    client.close()


# Every pattern that queues contenders under a name registers the same way.
HOLDS: dict[str, Callable[[EtcdPatterns], Any]] = {
    "lock": lambda patterns: patterns.locked("L"),
    "semaphore": lambda patterns: patterns.semaphore("L", 1),
    "read lock": lambda patterns: patterns.read_locked("L"),
    "write lock": lambda patterns: patterns.write_locked("L"),
    "election": lambda patterns: patterns.elected("L", "me"),
}


@pytest.mark.parametrize("kind", HOLDS)
def test_lost_answer_to_the_registration(
    faulty: EtcdPatterns, plan: Plan, raw: Raw, kind: str
) -> None:
    plan.lose["put"] = 1
    with HOLDS[kind](faulty) as held:
        assert raw.count("L/") == 1  # the retry found its key; no second contender
        assert raw.get(held.key).create_revision == held.fencing_token
    assert plan.lost == ["put"]
    assert raw.count("L/") == 0


@pytest.mark.parametrize("attempt", [*HOLDS, "try_lock"])
def test_a_late_copy_of_an_acquisition_leaves_no_contender(
    faulty: EtcdPatterns, plan: Plan, injector: FaultInjector, raw: Raw, attempt: str
) -> None:
    plan.lose["put"] = 1
    plan.action = "hold"  # the first attempt reaches etcd only after the lock was released
    if attempt == "try_lock":
        assert faulty.try_lock("L", lambda: "ran").value == "ran"
    else:
        with HOLDS[attempt](faulty):
            pass
    assert plan.lost == ["put"]
    (late,) = injector.deliver_held()
    assert not late.succeeded
    assert raw.count("L/") == 0


def test_lost_registrations_leave_one_bookkeeping_key_on_the_session_lease(
    faulty: EtcdPatterns, plan: Plan, injector: FaultInjector, raw: Raw
) -> None:
    plan.action = "hold"
    for _ in range(5):
        plan.lose["put"] = 1  # each lock's first registration reaches etcd late
        with faulty.locked("L") as held:
            lease = held.lease_id
    assert plan.lost == ["put"] * 5
    # Each was fenced by the one slot of the session, on the session lease:
    # the fences do not pile up, and go with the lease.
    start = raw.key(".etcd-patterns/slots/")
    slots = raw.client.kvstub.Range(
        etcdrpc.RangeRequest(key=start, range_end=etcd3.utils.prefix_range_end(start)), 10
    ).kvs
    assert [kv.lease for kv in slots] == [lease]
    assert not any(late.succeeded for late in injector.deliver_held())
    assert raw.count("L/") == 0
    faulty.close()
    assert raw.count(".etcd-patterns/") == 0


def test_lost_answer_to_try_lock(faulty: EtcdPatterns, plan: Plan, raw: Raw) -> None:
    plan.lose["put"] = 1
    result = faulty.try_lock("L", lambda: raw.count("L/"))
    assert result.acquired
    assert result.value == 1
    assert plan.lost == ["put"]


def test_lost_answer_to_the_release_is_not_a_lost_lock(
    faulty: EtcdPatterns, plan: Plan, raw: Raw
) -> None:
    plan.lose["delete"] = 1
    assert faulty.lock("L", lambda: "fine") == "fine"
    assert plan.lost == ["delete"]
    assert raw.count("L/") == 0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_release_etcd_missed_is_completed_when_it_returns(namespace: str) -> None:
    with (
        EtcdCluster() as cluster,
        # A TTL well beyond the pause, so that the lease lives through it.
        EtcdPatterns.connect(
            cluster.endpoints, namespace=namespace, timeout=1, session_ttl=6
        ) as patterns,
        Raw(cluster.endpoints, namespace) as raw,
    ):
        holding = patterns.locked("L")
        held = holding.__enter__()
        janitor = held._session._janitor
        cluster.nodes[0].pause()
        try:
            holding.__exit__(None, None, None)  # etcd does not answer: handed to the session
            assert janitor.pending == 1
        finally:
            cluster.nodes[0].resume()
        # The delete etcd had buffered, or the janitor's, removes the key;
        # the lease was never let go meanwhile.
        wait_until(lambda: raw.count("L/") == 0 and janitor.pending == 0, timeout=15)
        assert not held.lost.is_set()
        assert patterns._transport.lease_time_to_live(held.lease_id) > 0
        assert patterns.try_lock("L", lambda: "free").acquired


@pytest.mark.slow
def test_a_release_etcd_never_received_is_completed_by_the_session(
    faulty: EtcdPatterns, plan: Plan, raw: Raw
) -> None:
    holding = faulty.locked("L")
    held = holding.__enter__()
    janitor = held._session._janitor
    plan.action = "hold"
    plan.lose["delete"] = 1_000_000  # no delete of the lock's key reaches etcd
    holding.__exit__(None, None, None)
    assert plan.lost  # the fault fired
    assert janitor.pending == 1
    assert raw.count("L/") == 1
    plan.lose["delete"] = 0
    wait_until(lambda: janitor.pending == 0)
    # Deleted by the session's janitor, not by the lease running out.
    assert raw.count("L/") == 0
    assert not held.lost.is_set()
    assert faulty._transport.lease_time_to_live(held.lease_id) > 0


# -- Ctrl-C while a registration is in flight -------------------------------------


def _interrupt(_request: Any) -> None:
    raise KeyboardInterrupt


def test_ctrl_c_once_etcd_applied_a_waiters_registration_leaves_no_contender(
    faulty: EtcdPatterns, patterns: EtcdPatterns, plan: Plan, injector: FaultInjector, raw: Raw
) -> None:
    # etcd applies the put and answers; Ctrl-C arrives before the answer is
    # read. The waiter's key must be gone by the time the call gives up, not
    # a TTL later: the process may exit at once, and every later contender
    # would queue behind a key that nobody owns.
    plan.lose["put"] = 1
    injector.on_lost_response = _interrupt
    with patterns.locked("L"):
        with pytest.raises(KeyboardInterrupt):
            faulty.lock("L", lambda: None)
        assert plan.lost == ["put"]
        assert raw.count("L/") == 1  # only the holder's key
    assert patterns.try_lock("L", lambda: "free").acquired


def test_ctrl_c_once_etcd_applied_a_try_lock_leaves_the_lock_free(
    faulty: EtcdPatterns, patterns: EtcdPatterns, plan: Plan, injector: FaultInjector, raw: Raw
) -> None:
    plan.lose["put"] = 1
    injector.on_lost_response = _interrupt
    with pytest.raises(KeyboardInterrupt):
        faulty.try_lock("L", lambda: None)
    assert plan.lost == ["put"]
    assert raw.count("L/") == 0
    assert patterns.try_lock("L", lambda: "free").acquired


def test_ctrl_c_before_etcd_received_the_registration_shuts_out_its_late_copy(
    faulty: EtcdPatterns,
    patterns: EtcdPatterns,
    plan: Plan,
    injector: FaultInjector,
    raw: Raw,
) -> None:
    plan.lose["put"] = 1
    plan.action = "hold"
    injector.error = KeyboardInterrupt
    with patterns.locked("L"):
        with pytest.raises(KeyboardInterrupt):
            faulty.lock("L", lambda: None)
        assert plan.lost == ["put"]
        (late,) = injector.deliver_held()  # etcd receives the registration now
        assert not late.succeeded  # settled before the interruption went on
        assert raw.count("L/") == 1
    assert raw.count("L/") == 0


@pytest.mark.slow
def test_ctrl_c_with_etcd_away_shuts_out_the_late_copy_before_withdrawing(
    etcd: EtcdCluster | ExternalEtcd,
    namespace: str,
    patterns: EtcdPatterns,
    raw: Raw,
) -> None:
    # Ctrl-C while the registration is in flight, and etcd away for longer
    # than the settling may take: the write stays in doubt. Its late copy
    # must never create the key after the key was withdrawn, or a contender
    # that nobody owns would sit on a live lease, ahead of everyone.
    away = threading.Event()
    held: list[str] = []

    def plan(method: str, request: Any) -> str:
        if method != TXN:
            return "pass"
        if touches_lock(request, "request_put") and not held:
            held.append("registration")
            interceptor.error = KeyboardInterrupt
            away.set()
            return "hold"
        if away.is_set() and resolves(request):
            held.append("resolution")
            interceptor.error = LostResponse
            return "hold"
        return "pass"

    interceptor = FaultInjector(plan)
    client = client_with_faults(etcd.endpoints, interceptor)
    with EtcdPatterns(client, namespace=namespace) as faulty, patterns.locked("L"):
        with pytest.raises(KeyboardInterrupt):
            faulty.lock("L", lambda: None)
        assert held[0] == "registration"
        assert "resolution" in held  # settling was tried, and etcd did not answer
        away.clear()
        janitor = faulty._sessions.get()._janitor
        wait_until(lambda: janitor.pending == 0)  # settled, then withdrawn
        continuation, details, request = interceptor.held[0]
        late = continuation(details._replace(timeout=10.0), request).result()
        assert not late.succeeded  # the late copy of the registration is shut out
        assert raw.count("L/") == 1  # only the holder's key
    client.close()
    assert raw.count("L/") == 0
    assert patterns.try_lock("L", lambda: "free").acquired


def _checks_a_turn(request: Any) -> bool:
    """Whether a Txn reads a contender's own key and its predecessor (and writes nothing)."""
    ranges = [op.request_range for op in request.success if op.HasField("request_range")]
    return len(ranges) == 2 == len(request.success) and ranges[1].max_create_revision > 0


def test_a_lease_lost_just_after_a_lost_answer_was_settled_grants_nothing(
    faulty: EtcdPatterns, injector: FaultInjector, raw: Raw
) -> None:
    # The registration applies, its answer is lost, the commit settles it as
    # applied; then the lease lapses before the turn is read. The turn read
    # finds my key gone and no predecessor: that is not holding the lock.
    events: list[str] = []
    leases: list[int] = []

    def plan(method: str, request: Any) -> str:
        if method != TXN:
            return "pass"
        if not events and touches_lock(request, "request_put"):
            (put,) = [op.request_put for op in request.success if op.HasField("request_put")][:1]
            leases.append(put.lease)
            events.append("registration answer lost")
            return "lose-response"
        if events == ["registration answer lost"] and _checks_a_turn(request):
            raw.revoke(leases[0])
            events.append("lease revoked before the turn read")
        return "pass"

    injector.plan = plan
    with faulty.locked("L") as held:
        assert events == ["registration answer lost", "lease revoked before the turn read"]
        mine = raw.get(held.key)
        assert mine is not None  # granted from a read that saw my key
        assert mine.create_revision == held.fencing_token
        assert held.lease_id != leases[0]  # on a fresh session


@pytest.mark.parametrize("pattern", ["lock", "election"])
def test_a_registration_whose_answer_and_lease_are_lost_is_made_again(
    faulty: EtcdPatterns, injector: FaultInjector, raw: Raw, pattern: str
) -> None:
    # The registration applies; its answer is lost, and then its lease, so
    # nothing can tell whether it applied. The contender withdraws it and
    # registers afresh, rather than fail with OutcomeUnknownError.
    leases: list[int] = []

    def plan(method: str, request: Any) -> str:
        if method == TXN and not leases and touches_lock(request, "request_put"):
            (put,) = [op.request_put for op in request.success if op.HasField("request_put")][:1]
            leases.append(put.lease)
            return "lose-response"
        return "pass"

    injector.plan = plan
    injector.on_lost_response = lambda request: raw.revoke(leases[0])
    holding = faulty.locked("L") if pattern == "lock" else faulty.elected("L", "me")
    with holding as fence:
        assert leases  # the fault fired
        assert fence.lease_id != leases[0]  # on a fresh session
        assert raw.count("L/") == 1  # only the new registration
        assert raw.get(fence.key).create_revision == fence.fencing_token
    assert raw.count("L/") == 0


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["lock", "election"])
def test_a_registration_etcd_could_not_settle_is_reported_and_cleaned_up(
    hasty: EtcdPatterns, injector: FaultInjector, raw: Raw, pattern: str
) -> None:
    # etcd is away for the registration and for settling it; the lease
    # lives. Registering again could leave two keys: the wait ends with
    # OutcomeUnknownError, and the session deletes the key, if etcd has it.
    away: list[bool] = []
    injector.plan = lambda method, request: "hold" if away and method == TXN else "pass"
    hasty.transform("warm", lambda _: "up", default="")  # the session exists
    away.append(True)
    holding = hasty.locked("L") if pattern == "lock" else hasty.elected("L", "me")
    with pytest.raises(OutcomeUnknownError):
        holding.__enter__()
    away.clear()
    assert injector.held  # the fault fired
    injector.deliver_held()  # late copies: settled first, so none creates a key
    wait_until(lambda: raw.count("L/") == 0)


# -- proclaiming ------------------------------------------------------------------


def test_a_late_copy_of_a_proclamation_never_overwrites_a_later_one(
    hasty: EtcdPatterns, injector: FaultInjector, raw: Raw
) -> None:
    holding: list[bool] = []
    injector.plan = lambda method, request: "hold" if holding and method == TXN else "pass"
    with hasty.elected("E", "v0") as leadership:
        holding.append(True)  # the proclamation, and the settling of it, are held
        with pytest.raises(OutcomeUnknownError):
            leadership.proclaim("A")
        holding.clear()
        leadership.proclaim("B")
        late = injector.deliver_held()
        assert late  # the fault fired: copies of "A" reached etcd after "B"
        info = hasty.leader("E")
        assert info is not None
        assert info.value == "B"


def test_a_proclamation_whose_outcome_is_unknown_does_not_block_the_next(
    hasty: EtcdPatterns, injector: FaultInjector, raw: Raw
) -> None:
    phase: list[str] = []

    def puts_to_the_election(request: Any) -> bool:
        return any(
            op.HasField("request_put") and b"/E/" in op.request_put.key for op in request.success
        )

    def plan(method: str, request: Any) -> str:
        if method != TXN or phase in ([], ["done"]):
            return "pass"
        if phase == ["proclaim"] and puts_to_the_election(request):
            phase.append("applied, answer lost")
            return "lose-response"
        return "hold"  # the settling of it: its outcome stays unknown

    injector.plan = plan
    with hasty.elected("E", "v0") as leadership:
        phase.append("proclaim")
        with pytest.raises(OutcomeUnknownError):
            leadership.proclaim("A")
        assert phase == ["proclaim", "applied, answer lost"]  # the fault fired
        phase[:] = ["done"]
        assert hasty.leader("E").value == "A"  # type: ignore[union-attr]
        leadership.proclaim("B")  # the key changed: read once, proclaimed over it
        info = hasty.leader("E")
        assert info is not None
        assert (info.value, leadership.value) == ("B", "B")
