"""Sessions: one per TTL, granted without holding up other TTLs, retired when idle."""

from __future__ import annotations

import sys
import threading
from types import FrameType
from typing import Any

import pytest

import etcd_patterns._session as session_module
from etcd_patterns import EtcdPatterns, EtcdUnavailableError
from etcd_patterns import _ops as ops
from etcd_patterns._janitor import Janitor, Orphan
from etcd_patterns._retry import Deadline
from etcd_patterns._transport import CLEANUP_TIMEOUT
from tests.helpers import Raw, wait_until

# A lease of 3 s is refreshed every second. With the idle threshold set to
# IDLE, a session idle for IDLE is retired at the next refresh after the
# next idle check.
TTL = 3
REFRESH = TTL / 3
IDLE = 1.0
RETIRED_WITHIN = 2 * IDLE + 2 * REFRESH + CLEANUP_TIMEOUT


@pytest.fixture
def quick(patterns: EtcdPatterns, monkeypatch: pytest.MonkeyPatch) -> EtcdPatterns:
    """An instance whose per-TTL sessions count as idle after IDLE seconds."""
    monkeypatch.setattr(session_module.Session, "_idle_after", lambda _self: IDLE)
    return patterns


@pytest.mark.timeout(60)
def test_an_idle_session_of_another_ttl_is_retired(
    quick: EtcdPatterns,
) -> None:
    quick.transform("k", lambda v: "1", default="")
    own = quick._sessions.get()
    with quick.locked("L", ttl=TTL) as held:
        lease = held.lease_id
    assert lease != own.lease_id
    transport = quick._transport
    wait_until(lambda: transport.lease_time_to_live(lease) == -1, timeout=RETIRED_WITHIN)
    assert TTL not in quick._sessions._sessions
    assert transport.lease_time_to_live(own.lease_id) > 0  # the instance's own is kept
    with quick.locked("L", ttl=TTL) as again:  # a new one when needed again
        assert again.lease_id != lease
        assert again.is_owner()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_session_whose_lease_carries_a_key_is_not_retired(
    quick: EtcdPatterns, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "IDLE_RETIREMENT", IDLE)
    checks = threading.Semaphore(0)
    original = quick._transport.lease_keys

    def lease_keys(*args: Any, **kwargs: Any) -> Any:
        keys = original(*args, **kwargs)
        checks.release()
        return keys

    monkeypatch.setattr(quick._transport, "lease_keys", lease_keys)
    with quick.locked("L", ttl=TTL) as held:
        for _ in range(2):  # two idle checks, each of which found the lock's key
            assert checks.acquire(timeout=RETIRED_WITHIN)
        assert held.is_owner()
        assert quick._sessions._sessions[TTL].lease_id == held.lease_id
        assert not held.lost.is_set()


def _in(function: str, thread: threading.Thread) -> bool:
    frame: FrameType | None = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


@pytest.mark.timeout(60)
def test_a_slow_grant_holds_up_only_the_callers_of_its_ttl(
    patterns: EtcdPatterns, monkeypatch: pytest.MonkeyPatch
) -> None:
    patterns.transform("k", lambda v: "1", default="")  # the instance's own session exists
    granting, release = threading.Event(), threading.Event()
    grants: list[int] = []
    original = patterns._transport.lease_grant

    def lease_grant(ttl: int, **kwargs: Any) -> Any:
        grants.append(ttl)
        if ttl == 9:
            granting.set()
            assert release.wait(30)
        return original(ttl, **kwargs)

    monkeypatch.setattr(patterns._transport, "lease_grant", lease_grant)
    results: list[object] = []
    first = threading.Thread(target=lambda: results.append(patterns.lock("A", lambda: 1, ttl=9)))
    second = threading.Thread(target=lambda: results.append(patterns.lock("B", lambda: 2, ttl=9)))
    first.start()
    assert granting.wait(10)
    # Meanwhile the instance's own session serves writes.
    writer = threading.Thread(target=lambda: patterns.transform("k", lambda v: v + "2"))
    writer.start()
    writer.join(timeout=10)
    assert not writer.is_alive(), "a write waited for another TTL's lease grant"
    assert patterns.get_values("k") == ["12"]
    second.start()
    wait_until(lambda: _in("_await", second))  # waits on the grant in progress
    release.set()
    first.join(timeout=30)
    second.join(timeout=30)
    assert sorted(results) == [1, 2]  # type: ignore[type-var]
    assert grants.count(9) == 1  # one grant, shared


@pytest.mark.timeout(60)
def test_callers_waiting_on_a_failed_grant_share_its_error(
    patterns: EtcdPatterns, monkeypatch: pytest.MonkeyPatch
) -> None:
    granting, release = threading.Event(), threading.Event()

    def lease_grant(ttl: int, **kwargs: Any) -> Any:
        granting.set()
        assert release.wait(30)
        raise EtcdUnavailableError("etcd is away")

    monkeypatch.setattr(patterns._transport, "lease_grant", lease_grant)
    errors: list[BaseException] = []

    def lock() -> None:
        try:
            patterns.lock("A", lambda: None, ttl=9)
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)

    first, second = threading.Thread(target=lock), threading.Thread(target=lock)
    first.start()
    assert granting.wait(10)
    second.start()
    wait_until(lambda: _in("_await", second))
    release.set()
    first.join(timeout=30)
    second.join(timeout=30)
    assert [type(e) for e in errors] == [EtcdUnavailableError, EtcdUnavailableError]
    assert errors[0] is not errors[1]
    assert patterns._sessions._grants == {}


# -- the janitor ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_no_key_is_deleted_while_a_write_left_in_doubt_meanwhile_is_unsettled(
    patterns: EtcdPatterns, namespace: str, raw: Raw
) -> None:
    # The keepalive thread's sweep is settling an older write in doubt when
    # another thread leaves one more in doubt and abandons the key that
    # write may have created. The sweep must not delete that key before the
    # newer resolution is answered: a late copy of the write could create it
    # again, on a live lease, with nobody left to delete it.
    transport = patterns._transport
    lease = raw.grant(30)
    key = f"{namespace}maybe-created".encode()
    raw.put("maybe-created", "v", lease=lease)
    janitor = Janitor(transport, lease)
    older = ops.txn(compare=[], success=[ops.get(b"older")], failure=[])
    newer = ops.txn(compare=[], success=[ops.get(b"newer")], failure=[])
    away = threading.Event()
    away.set()
    original = transport.txn

    def txn(request: Any, **kwargs: Any) -> Any:
        if request is older and not janitor.pending > 1:
            janitor.settle_first(newer)  # meanwhile, on another thread
            janitor.abandon(Orphan(key))
        if request is newer and away.is_set():
            raise EtcdUnavailableError("etcd is away")
        return original(request, **kwargs)

    transport.txn = txn  # type: ignore[method-assign]
    janitor.settle_first(older)
    janitor.sweep(Deadline(5))
    assert raw.value("maybe-created") == b"v"  # kept while the newer write is in doubt
    assert janitor.pending == 2
    away.clear()
    janitor.sweep(Deadline(5))
    assert raw.value("maybe-created") is None
    assert janitor.pending == 0


@pytest.mark.timeout(60)
def test_a_grant_interrupted_after_etcd_granted_leaves_nothing_behind(
    patterns: EtcdPatterns, monkeypatch: pytest.MonkeyPatch
) -> None:
    granted: list[int] = []
    original = patterns._transport.lease_grant

    def lease_grant(ttl: int, **kwargs: Any) -> Any:
        response = original(ttl, **kwargs)
        granted.append(response.ID)
        return response

    def interrupted() -> bool:
        raise KeyboardInterrupt  # Ctrl-C just after etcd granted the lease

    monkeypatch.setattr(patterns._transport, "lease_grant", lease_grant)
    monkeypatch.setattr(patterns._sessions, "_closed_meanwhile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        patterns.lock("A", lambda: None, ttl=9)
    assert patterns._sessions._grants == {}  # nobody will wait on it
    (lease,) = granted
    assert patterns._transport.lease_time_to_live(lease) == -1  # revoked, not leaked
    monkeypatch.undo()
    assert patterns.lock("A", lambda: "next", ttl=9) == "next"


@pytest.mark.timeout(60)
def test_withdraw_settles_a_write_in_doubt_then_deletes_what_it_may_have_created(
    patterns: EtcdPatterns, namespace: str, raw: Raw
) -> None:
    transport = patterns._transport
    lease = raw.grant(30)
    raw.put("maybe-created", "mine", lease=lease)
    created = raw.put("certainly-created", "mine", lease=lease)
    janitor = Janitor(transport, lease)
    resolution = ops.txn(compare=[], success=[ops.get(b"resolution")], failure=[])
    sent: list[str] = []
    away = threading.Event()
    original = transport.txn

    def txn(request: Any, **kwargs: Any) -> Any:
        sent.append("resolution" if request is resolution else "delete")
        if request is resolution and away.is_set():
            raise EtcdUnavailableError("etcd is away")
        return original(request, **kwargs)

    transport.txn = txn  # type: ignore[method-assign]
    maybe = Orphan(f"{namespace}maybe-created".encode(), value=b"mine")
    certain = Orphan(f"{namespace}certainly-created".encode(), create_revision=created)

    # etcd away: the sweep fails to settle, and a withdrawal right after it
    # does not try again, nor delete what the write may have created; a key
    # whose create revision is known is deleted all the same.
    away.set()
    janitor.settle_first(resolution)
    janitor.sweep(Deadline(5))
    sent.clear()
    assert not janitor.withdraw(maybe)
    assert sent == []
    assert raw.value("maybe-created") == b"mine"
    assert janitor.withdraw(certain)
    assert sent == ["delete"]
    assert raw.value("certainly-created") is None
    # etcd back: the resolution goes first, then the delete.
    away.clear()
    janitor._failed_at = float("-inf")  # as if the failure were long past
    sent.clear()
    assert janitor.withdraw(Orphan(maybe.key, value=b"mine"))
    assert sent == ["resolution", "delete"]
    assert raw.value("maybe-created") is None
    janitor.sweep(Deadline(5))  # the abandoned copy: already gone, harmless
    assert janitor.pending == 0
