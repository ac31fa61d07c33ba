"""Sessions: one per TTL, granted without holding up other TTLs, retired when idle."""

from __future__ import annotations

import sys
import threading
from types import FrameType
from typing import Any

import pytest

import etcd_patterns._session as session_module
from etcd_patterns import EtcdPatterns, EtcdUnavailableError
from etcd_patterns._transport import CLEANUP_TIMEOUT
from tests.helpers import wait_until

# A lease of 3 s is refreshed every second; with IDLE, a session idle for
# IDLE is retired at the next refresh after the next idle check.
TTL = 3
REFRESH = TTL / 3
IDLE = 1.0
RETIRED_WITHIN = 2 * IDLE + 2 * REFRESH + CLEANUP_TIMEOUT


@pytest.mark.timeout(60)
def test_an_idle_session_of_another_ttl_is_retired(
    patterns: EtcdPatterns, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "IDLE_RETIREMENT", IDLE)
    patterns.transform("k", lambda v: "1", default="")
    own = patterns._sessions.get()
    with patterns.locked("L", ttl=TTL) as held:
        lease = held.lease_id
    assert lease != own.lease_id
    transport = patterns._transport
    wait_until(lambda: transport.lease_time_to_live(lease) == -1, timeout=RETIRED_WITHIN)
    assert TTL not in patterns._sessions._sessions
    assert transport.lease_time_to_live(own.lease_id) > 0  # the instance's own is kept
    with patterns.locked("L", ttl=TTL) as again:  # a new one when needed again
        assert again.lease_id != lease
        assert again.is_owner()


@pytest.mark.timeout(60)
def test_a_session_whose_lease_carries_a_key_is_not_retired(
    patterns: EtcdPatterns, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "IDLE_RETIREMENT", IDLE)
    checks = threading.Semaphore(0)
    original = patterns._transport.lease_keys

    def lease_keys(*args: Any, **kwargs: Any) -> Any:
        keys = original(*args, **kwargs)
        checks.release()
        return keys

    monkeypatch.setattr(patterns._transport, "lease_keys", lease_keys)
    with patterns.locked("L", ttl=TTL) as held:
        for _ in range(2):  # two idle checks, each of which found the lock's key
            assert checks.acquire(timeout=RETIRED_WITHIN)
        assert held.is_owner()
        assert patterns._sessions._sessions[TTL].lease_id == held.lease_id
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
