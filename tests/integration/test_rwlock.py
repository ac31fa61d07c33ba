"""Read-write locks on a real etcd: sharing, exclusion, fairness, the Go recipe's layout, cost."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from etcd_patterns import (
    EtcdPatterns,
    HeldRWLock,
    LockLostError,
    LockReentryError,
    LockTimeoutError,
)
from etcd_patterns.testing import EtcdCluster, ExternalEtcd
from tests.helpers import SCHEDULING_GRACE, Raw, run_processes, wait_until, watchers

Etcd = EtcdCluster | ExternalEtcd


def keys(raw: Raw) -> int:
    return raw.count("RW/")


def test_readers_share_and_a_writer_excludes_them(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    with EtcdPatterns.connect(etcd.endpoints, namespace=namespace) as third:
        with patterns.read_locked("RW") as first, other.read_locked("RW", timeout=5) as second:
            assert (first.mode, second.mode) == ("read", "read")
            assert first.key.startswith("RW/read/")
            with pytest.raises(LockTimeoutError):
                third.write_locked("RW", timeout=0.2).__enter__()
            assert keys(raw) == 2  # the writer that gave up left nothing
        with patterns.write_locked("RW") as writer:
            assert writer.key.startswith("RW/write/")
            with pytest.raises(LockTimeoutError):
                other.read_locked("RW", timeout=0.2).__enter__()
            with pytest.raises(LockTimeoutError):
                third.write_locked("RW", timeout=0.2).__enter__()
    assert keys(raw) == 0


def test_a_reader_behind_a_waiting_writer_waits_for_it(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    order: list[str] = []
    with EtcdPatterns.connect(etcd.endpoints, namespace=namespace) as writing:
        reading = patterns.read_locked("RW")
        reading.__enter__()

        def write() -> None:
            with writing.write_locked("RW", timeout=30):
                order.append("writer")

        writer = threading.Thread(target=write)
        writer.start()
        wait_until(lambda: keys(raw) == 2)  # the writer waits behind the reader
        # Only a reader holds, yet a new reader queues behind the writer.
        with pytest.raises(LockTimeoutError):
            writing.read_locked("RW", timeout=0.3).__enter__()
        reader = threading.Thread(
            target=lambda: _run(writing.read_locked("RW", timeout=30), order, "late reader")
        )
        reader.start()
        wait_until(lambda: keys(raw) == 3)
        reading.__exit__(None, None, None)
        writer.join(timeout=30)
        reader.join(timeout=30)
    assert order == ["writer", "late reader"]


@pytest.mark.timeout(60)
def test_a_writer_behind_readers_reads_again_rather_than_replay(
    etcd: Etcd, namespace: str, raw: Raw
) -> None:
    # Readers ahead hold together, and any of them may leave at any moment:
    # however many there are, a writer behind them must not count on
    # etcd's slow history replay to learn of it.
    instances = [EtcdPatterns.connect(etcd.endpoints, namespace=namespace) for _ in range(4)]
    *reading, writing = instances
    creates: list[int] = []
    order: list[str] = []
    original = writing._transport.watch

    def counted(requests: Any, **kwargs: Any) -> Any:
        creates.append(len(requests))
        return original(requests, **kwargs)

    writing._transport.watch = counted  # type: ignore[method-assign,assignment]
    try:
        readers = [instance.read_locked("RW") for instance in reading]
        for reader in readers:
            reader.__enter__()
        writer = threading.Thread(target=lambda: _run(writing.write_locked("RW"), order, "w"))
        writer.start()
        wait_until(lambda: len(creates) == 1)  # watching, behind three readers
        for reader in readers:
            reader.__exit__(None, None, None)
        writer.join(timeout=30)
        assert not writer.is_alive()
    finally:
        for instance in instances:
            instance.close()
    assert order == ["w"]
    assert creates[0] == 1  # the newest reader's key, from the current revision only
    assert keys(raw) == 0


def _run(holding: Any, order: list[str], name: str) -> None:
    with holding:
        order.append(name)


def test_a_writer_gets_in_while_readers_stream_in(
    etcd: Etcd, namespace: str, other: EtcdPatterns, raw: Raw
) -> None:
    section = 0.05  # how long each reader holds the lock
    stop = threading.Event()
    instances = [EtcdPatterns.connect(etcd.endpoints, namespace=namespace) for _ in range(3)]

    def stream(instance: EtcdPatterns) -> None:
        while not stop.is_set():
            with instance.read_locked("RW", timeout=30):
                stop.wait(section)  # the reader's own work

    readers = [threading.Thread(target=stream, args=(instance,)) for instance in instances]
    try:
        for reader in readers:
            reader.start()
        wait_until(lambda: keys(raw) >= 1)
        asked = time.monotonic()
        with other.write_locked("RW", timeout=30):
            waited = time.monotonic() - asked
    finally:
        stop.set()
        for reader in readers:
            reader.join(timeout=30)
        for instance in instances:
            instance.close()
    print(f"the writer waited {waited:.3f}s for the readers ahead of it")
    # Only the readers registered before it: one section each, at once.
    assert waited < section + SCHEDULING_GRACE


def test_a_thread_cannot_take_the_lock_twice(patterns: EtcdPatterns, raw: Raw) -> None:
    with patterns.read_locked("RW"):
        before = raw.revision()
        with pytest.raises(LockReentryError):
            patterns.write_locked("RW").__enter__()
        with pytest.raises(LockReentryError):
            patterns.read_locked("RW").__enter__()
        assert raw.revision() == before


def test_guarded_writes_and_a_lost_hold(patterns: EtcdPatterns, raw: Raw) -> None:
    with patterns.write_locked("RW") as held:
        patterns.transform("data", lambda _: "written", default="", guard=held)
    with pytest.raises(LockLostError):
        patterns.transform("data", lambda _: "stale", guard=held)
    holding = patterns.read_locked("RW", ttl=3)  # refreshed every second: the loss is heard soon
    reader: HeldRWLock = holding.__enter__()
    raw.revoke(reader.lease_id)
    assert reader.lost.wait(timeout=30)
    with pytest.raises(LockLostError):
        holding.__exit__(None, None, None)
    assert raw.value("data") == b"written"


# -- the Go recipe's layout -----------------------------------------------------


def test_a_writer_key_in_the_go_layout_excludes_our_readers(
    etcd: Etcd, patterns: EtcdPatterns, raw: Raw
) -> None:
    # What Go's recipe.RWMutex.Lock writes: name/write/<nanoseconds>, on a lease.
    lease = raw.grant(30)
    raw.put(f"RW/write/{time.time_ns()}", "", lease=lease)
    with pytest.raises(LockTimeoutError):
        patterns.read_locked("RW", timeout=0.3).__enter__()
    got = threading.Event()
    before = watchers(etcd)

    def read() -> None:
        with patterns.read_locked("RW", timeout=30):
            got.set()

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: watchers(etcd) > before)  # it watches the Go writer's key
    assert not got.is_set()
    raw.revoke(lease)  # the Go writer unlocks (or dies)
    reader.join(timeout=30)
    assert got.is_set()


def test_our_writer_key_is_what_a_go_reader_waits_on(patterns: EtcdPatterns, raw: Raw) -> None:
    with patterns.write_locked("RW") as writer:
        # Go's RLock reads the newest key under the prefix name/write, by
        # revision, older than its own: ours.
        newest = max(
            (kv for _, kv in raw.client.get_prefix(raw.key("RW/write"))),
            key=lambda kv: kv.mod_revision,
        )
        assert newest.key == raw.key(writer.key)
        assert newest.lease_id == writer.lease_id


# -- processes ------------------------------------------------------------------


def _worker(
    endpoints: list[str],
    namespace: str,
    readers: int,
    rounds: int,
    log: str,
    meet: Any,
    met: Any,
    start: Any,
) -> None:
    # The first `readers` processes through the start barrier read; the
    # others write.
    mode = "read" if start.wait(timeout=60) < readers else "write"
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd:
        if mode == "read":
            # Round 0, readers only: every reader holds the lock at once, or
            # the barrier breaks and the process fails.
            with etcd.read_locked("RW", timeout=60):
                meet.wait(timeout=60)
            met.set()
        else:
            met.wait(timeout=60)
        holding = etcd.read_locked if mode == "read" else etcd.write_locked
        for _ in range(rounds):
            with holding("RW", timeout=120):
                began = time.monotonic_ns()
                time.sleep(0.005)  # the section's own work
                ended = time.monotonic_ns()
            with open(log, "a") as out:
                out.write(f"{mode} {os.getpid()} {began} {ended}\n")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_readers_and_writers_across_processes(
    etcd: Etcd, namespace: str, raw: Raw, tmp_path: Path
) -> None:
    context = multiprocessing.get_context("spawn")
    readers, writers, rounds = 6, 2, 10
    meet, met = context.Barrier(readers), context.Event()
    log = tmp_path / "sections.log"
    run_processes(
        _worker,
        (etcd.endpoints, namespace, readers, rounds, str(log), meet, met),
        readers + writers,
        timeout=200,
    )
    sections = [line.split() for line in log.read_text().splitlines()]
    intervals = sorted((int(began), int(ended), mode) for mode, _, began, ended in sections)
    assert len(intervals) == (readers + writers) * rounds
    overlapping = [(a, b) for a, b in itertools.combinations(intervals, 2) if b[0] < a[1]]
    conflicts = [(a, b) for a, b in overlapping if "write" in (a[2], b[2])]
    print(
        f"{len(intervals)} sections after the readers all met; "
        f"readers overlapped {len(overlapping) - len(conflicts)} times; conflicts {conflicts}"
    )
    assert conflicts == []  # no reader with a writer, no writer with a writer
    assert keys(raw) == 0


# -- cost -----------------------------------------------------------------------


def test_costs_in_round_trips(etcd: Etcd, patterns: EtcdPatterns) -> None:
    with patterns.read_locked("RW"):  # the session lease is granted once, on first use
        pass
    for mode in ("read", "write"):
        holding = patterns.read_locked if mode == "read" else patterns.write_locked
        with etcd.count_rpcs() as rpcs, holding("RW"):
            pass
        assert rpcs.requests == {"etcdserverpb.KV/Txn": 2}, mode
