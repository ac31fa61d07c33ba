"""The one wait loop: nothing missed between a read and its watch, no spin, bounded."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
from etcd3 import etcdrpc

from etcd_patterns import EtcdPatterns
from etcd_patterns._retry import Deadline
from etcd_patterns._transport import Transport
from etcd_patterns._wait import _BROKEN_PAUSE, RECHECK_INTERVAL, Watch, wait
from tests.helpers import Raw


class _Key(NamedTuple):
    exists: bool
    revision: int


class _Probe:
    """Reads one key and counts the reads and watch streams of a wait on it."""

    def __init__(self, transport: Transport, key: bytes) -> None:
        self.transport = transport
        self.key = key
        self.reads = 0
        self.streams = 0
        original = transport.watch

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.streams += 1
            return original(*args, **kwargs)

        transport.watch = counting  # type: ignore[method-assign]

    def read(self) -> _Key:
        self.reads += 1
        response = self.transport.range(etcdrpc.RangeRequest(key=self.key))
        return _Key(bool(response.kvs), response.header.revision)

    def until_it_exists(self, state: _Key) -> Watch | None:
        if state.exists:
            return None
        return Watch([etcdrpc.WatchCreateRequest(key=self.key)], lambda _event: True)

    def wait_until_it_exists(self, state: _Key) -> _Key:
        return wait(
            self.transport,
            state,
            read=self.read,
            watch=self.until_it_exists,
            deadline=Deadline(3 * RECHECK_INTERVAL),
            timeout_error=lambda: AssertionError("missed"),
        )


@pytest.fixture
def probe(patterns: EtcdPatterns, namespace: str) -> _Probe:
    return _Probe(patterns._transport, f"{namespace}k".encode())


@pytest.mark.timeout(30)
def test_a_change_between_the_read_and_the_watch_is_not_missed(probe: _Probe, raw: Raw) -> None:
    before = probe.read()
    assert not before.exists
    raw.put("k", "v")  # after the read, before any watch exists
    after = probe.wait_until_it_exists(before)
    assert after.exists
    # Found by the read made once the watch existed, not by a recheck.
    assert (probe.streams, probe.reads) == (1, 2)


@pytest.mark.timeout(30)
def test_a_change_while_watching_wakes_the_waiter(probe: _Probe, raw: Raw) -> None:
    before = probe.read()
    watching = threading.Event()
    original = probe.transport.watch

    def announced(*args: Any, **kwargs: Any) -> Any:
        for response in original(*args, **kwargs):
            if response.created:
                watching.set()
            yield response

    probe.transport.watch = announced  # type: ignore[method-assign]
    putter = threading.Thread(target=lambda: watching.wait(10) and raw.put("k", "v"))
    putter.start()
    after = probe.wait_until_it_exists(before)
    putter.join(timeout=10)
    assert after.exists
    assert probe.streams == 1


def _wait_with_replay(probe: _Probe, state: _Key) -> _Key:
    def until_it_exists(state: _Key) -> Watch | None:
        waiting = probe.until_it_exists(state)
        return None if waiting is None else waiting._replace(replay=True)

    return wait(
        probe.transport,
        state,
        read=probe.read,
        watch=until_it_exists,
        deadline=Deadline(3 * RECHECK_INTERVAL),
        timeout_error=lambda: AssertionError("missed"),
    )


def _stream_hook(probe: _Probe, before: Callable[[], object]) -> list[Any]:
    """Run ``before`` as each stream opens; return the events the streams deliver."""
    events: list[Any] = []
    original = probe.transport.watch

    def hooked(*args: Any, **kwargs: Any) -> Iterator[Any]:
        before()
        for response in original(*args, **kwargs):
            events.extend(response.events)
            yield response

    probe.transport.watch = hooked  # type: ignore[method-assign,assignment]
    return events


@pytest.mark.timeout(30)
def test_with_replay_a_change_before_the_watch_is_seen_by_the_watch(
    probe: _Probe, raw: Raw
) -> None:
    before = probe.read()
    # After the read, before the stream: only a watch from the read's
    # revision can see it.
    events = _stream_hook(probe, lambda: raw.put("k", "v"))
    after = _wait_with_replay(probe, before)
    assert after.exists
    assert [event.kv.key for event in events] == [probe.key]
    assert (probe.streams, probe.reads) == (1, 2)


@pytest.mark.timeout(30)
def test_with_replay_no_read_follows_when_etcd_moved_on(probe: _Probe, raw: Raw) -> None:
    before = probe.read()
    watching = threading.Event()
    # etcd moves on (another key) between the read and the stream.
    _stream_hook(probe, lambda: raw.put("other", "v"))
    original = probe.transport.watch
    created = 0

    def announced(creates: Any, **kwargs: Any) -> Iterator[Any]:
        nonlocal created
        for response in original(creates, **kwargs):
            created += response.created
            if created == len(creates):
                watching.set()
            yield response

    probe.transport.watch = announced  # type: ignore[method-assign,assignment]
    putter = threading.Thread(target=lambda: watching.wait(10) and raw.put("k", "v"))
    putter.start()
    after = _wait_with_replay(probe, before)
    putter.join(timeout=10)
    assert after.exists
    # The first read, and the one after the event: none in between.
    assert (probe.streams, probe.reads) == (1, 2)


@pytest.mark.timeout(30)
def test_a_stream_that_keeps_failing_at_once_is_not_a_spin(probe: _Probe) -> None:
    def broken(*args: Any, **kwargs: Any) -> Iterator[Any]:
        probe.streams += 1
        yield from ()  # ends before watching anything, as a failed stream does

    probe.transport.watch = broken  # type: ignore[method-assign,assignment]
    limit = 1.0
    with pytest.raises(TimeoutError):
        wait(
            probe.transport,
            probe.read(),
            read=probe.read,
            watch=probe.until_it_exists,
            deadline=Deadline(limit),
            timeout_error=lambda: TimeoutError("gave up in time"),
        )
    # At most one stream, and one read, per pause.
    assert probe.streams <= limit / _BROKEN_PAUSE + 2
    assert probe.reads <= limit / _BROKEN_PAUSE + 3
