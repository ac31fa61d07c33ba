"""Chaos on a 3-node cluster: leaders killed, clients paused and killed.

Each test starts its own cluster and prints what it measured. They are
marked ``chaos``: they kill etcd members while clients write, which etcd
3.5.0 to 3.5.2 do not survive intact (see docs/testing.md).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from etcd3 import etcdrpc

from etcd_patterns import (
    EtcdPatterns,
    EtcdUnavailableError,
    LeadershipLostError,
    LockLostError,
    OutcomeUnknownError,
    QueueEmptyError,
)
from etcd_patterns._wait import RECHECK_INTERVAL
from etcd_patterns.testing import EtcdCluster, external_from_environment
from tests.helpers import SCHEDULING_GRACE, Raw, freed_within, wait_until

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.timeout(150),
    pytest.mark.skipif(
        external_from_environment() is not None, reason="kills etcd members it started itself"
    ),
]


def incr(value: str) -> str:
    return str(int(value) + 1)


@pytest.fixture
def cluster() -> Iterator[EtcdCluster]:
    with EtcdCluster(size=3) as started:
        yield started


def spawn(target: Any, *args: Any) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    return process


def kill_and_restart_the_leader(cluster: EtcdCluster, progress: Any) -> None:
    """SIGKILL the leader once work is under way; restart it after more work."""
    progress(1)
    leader = cluster.leader()
    leader.kill()
    progress(2)
    leader.restart()
    progress(3)


# -- leader kill during locking -------------------------------------------------


def _lock_worker(endpoints: list[str], namespace: str, rounds: int, out: str) -> None:
    done = 0
    lost = 0
    with EtcdPatterns.connect(endpoints, namespace=namespace, timeout=10) as etcd:
        while done < rounds:
            try:
                with etcd.locked("mutex", timeout=60) as held:
                    began = time.monotonic_ns()
                    etcd.transform("counter", incr, default="0", guard=held)
                    ended = time.monotonic_ns()
                    with open(out, "a") as log:
                        log.write(f"{began} {ended}\n")
                    done += 1
            except LockLostError:
                lost += 1  # the guarded write did not happen; try again
    with open(out + ".lost", "w") as report:
        report.write(str(lost))


def test_leader_kill_during_locking(cluster: EtcdCluster, tmp_path: Path) -> None:
    namespace, workers, rounds = "/chaos/lock/", 4, 25
    outs = [str(tmp_path / f"worker{i}.log") for i in range(workers)]
    processes = [spawn(_lock_worker, cluster.endpoints, namespace, rounds, out) for out in outs]
    with EtcdPatterns.connect(cluster.endpoints, namespace=namespace) as observer:

        def counter() -> int:
            return int((observer.get_values("counter") or ["0"])[0])

        def progress(stage: int) -> None:
            wait_until(lambda: counter() >= 25 * stage, timeout=90)

        kill_and_restart_the_leader(cluster, progress)
        for process in processes:
            process.join(timeout=120)
        assert [p.exitcode for p in processes] == [0] * workers  # every process finished
        final = counter()
    intervals = sorted(
        (int(a), int(b))
        for out in outs
        for a, b in (line.split() for line in Path(out).read_text().splitlines())
    )
    overlaps = sum(1 for x, y in itertools.pairwise(intervals) if y[0] < x[1])
    lost = sum(int(Path(out + ".lost").read_text()) for out in outs)
    print(f"counter {final}, guarded writes {len(intervals)}, overlaps {overlaps}, lost {lost}")
    assert final == workers * rounds == len(intervals)
    assert overlaps == 0


# -- leader kill during the queue -------------------------------------------------


def _produce(endpoints: list[str], namespace: str, name: str, count: int) -> None:
    with EtcdPatterns.connect(endpoints, namespace=namespace, timeout=10) as etcd:
        for i in range(count):
            etcd.enqueue("q", f"{name}:{i}")


def _consume(endpoints: list[str], namespace: str, mode: str, out: str, done: Any) -> None:
    with (
        EtcdPatterns.connect(endpoints, namespace=namespace, timeout=10) as etcd,
        open(out, "w") as log,
    ):
        while True:
            try:
                if mode == "dequeue":
                    log.write(f"got {etcd.dequeue('q', timeout=1)}\n")
                else:
                    with etcd.claim("q", timeout=1) as item:
                        log.write(f"seen {item.value}\n")
                    log.write(f"got {item.value}\n")  # acked
                log.flush()
            except QueueEmptyError:
                if done.is_set():
                    return
            except BaseException as exc:
                log.write(f"error {exc!r}\n")
                raise


@pytest.mark.parametrize("mode", ["dequeue", "claim"])
def test_leader_kill_during_the_queue(cluster: EtcdCluster, tmp_path: Path, mode: str) -> None:
    namespace, producers, consumers, count = f"/chaos/{mode}/", 3, 3, 300
    done = multiprocessing.get_context("spawn").Event()
    outs = [str(tmp_path / f"consumer{i}.log") for i in range(consumers)]
    consuming = [spawn(_consume, cluster.endpoints, namespace, mode, out, done) for out in outs]
    producing = [
        spawn(_produce, cluster.endpoints, namespace, f"p{i}", count) for i in range(producers)
    ]
    with EtcdPatterns.connect(cluster.endpoints, namespace=namespace) as observer:

        def progress(stage: int) -> None:
            wait_until(lambda: sum(_count(out, "got") for out in outs) >= 150 * stage, timeout=90)

        kill_and_restart_the_leader(cluster, progress)
        for process in producing:
            process.join(timeout=120)
        done.set()
        for process in consuming:
            process.join(timeout=120)
        exitcodes = [p.exitcode for p in producing + consuming]
        left = len(observer.get_values("q"))
    lines = [line.split(" ", 1) for out in outs for line in Path(out).read_text().splitlines()]
    assert [item for kind, item in lines if kind == "error"] == []
    got = [item for kind, item in lines if kind == "got"]
    seen = [item for kind, item in lines if kind == "seen"]
    received = len(got)
    expected = {f"p{p}:{i}" for p in range(producers) for i in range(count)}
    lost = len(expected - set(got))
    duplicated = received - len(set(got))
    redelivered = len(seen) - len(set(seen))
    print(
        f"{mode}: received {received} of {len(expected)}; lost {lost}, duplicated {duplicated}, "
        f"redelivered {redelivered}, left in the queue {left}"
    )
    assert exitcodes == [0] * (producers + consumers)
    assert lost == 0
    assert duplicated == 0  # with claim: acked exactly once
    assert left == 0


def _count(path: str, prefix: str) -> int:
    try:
        return sum(1 for line in Path(path).read_text().splitlines() if line.startswith(prefix))
    except FileNotFoundError:
        return 0


# -- a paused holder --------------------------------------------------------------


def _paused_holder(endpoints: list[str], namespace: str, ready: Any, resume: Any, out: str) -> None:
    outcome = []
    with EtcdPatterns.connect(endpoints, namespace=namespace, timeout=5) as etcd:
        try:
            with etcd.locked("L", ttl=2) as held:
                ready.set()
                resume.wait(timeout=60)  # SIGSTOP lands here
                try:
                    etcd.transform("data", lambda _: "stale write", guard=held)
                    outcome.append("written")
                except LockLostError:
                    outcome.append("guarded write rejected")
        except LockLostError:
            outcome.append("LockLostError")
    Path(out).write_text("\n".join(outcome))


def test_a_paused_holder_cannot_write(cluster: EtcdCluster, tmp_path: Path) -> None:
    namespace = "/chaos/paused/"
    context = multiprocessing.get_context("spawn")
    ready, resume = context.Event(), context.Event()
    out = str(tmp_path / "holder.txt")
    holder = spawn(_paused_holder, cluster.endpoints, namespace, ready, resume, out)
    try:
        assert ready.wait(timeout=30)
        os.kill(holder.pid or 0, signal.SIGSTOP)
        with EtcdPatterns.connect(cluster.endpoints, namespace=namespace) as other:
            stopped = time.monotonic()
            with other.locked("L", timeout=30) as held:  # once the paused lease expires
                taken = time.monotonic() - stopped
                other.transform("data", lambda _: "current holder", default="", guard=held)
                os.kill(holder.pid or 0, signal.SIGCONT)
                resume.set()
                holder.join(timeout=30)
            assert other.get_values("data") == ["current holder"]
    finally:
        if holder.is_alive():
            os.kill(holder.pid or 0, signal.SIGCONT)
            holder.join(timeout=30)
    outcome = Path(out).read_text().splitlines()
    print(f"lock taken over {taken:.1f}s after the pause; the paused holder saw {outcome}")
    assert outcome == ["guarded write rejected", "LockLostError"]
    assert holder.exitcode == 0


# -- a paused leader ----------------------------------------------------------------


def _paused_leader(endpoints: list[str], namespace: str, ready: Any, resume: Any, out: str) -> None:
    outcome = []
    timeout, ttl = 5, 2
    with EtcdPatterns.connect(endpoints, namespace=namespace, timeout=timeout) as etcd:
        try:
            with etcd.elected("E", "paused", ttl=ttl) as leadership:
                ready.set()
                resume.wait(timeout=60)  # SIGSTOP lands here
                # The next keepalive, due at once, hears from etcd that the
                # lease is gone; it may take one request timeout.
                if leadership.lost.wait(timeout=ttl + timeout):
                    outcome.append("lost")
                try:
                    leadership.proclaim("stale value")
                    outcome.append("proclaimed")
                except LeadershipLostError:
                    outcome.append("proclaim rejected")
                try:
                    etcd.transform("data", lambda _: "stale write", guard=leadership)
                    outcome.append("written")
                except LeadershipLostError:
                    outcome.append("guarded write rejected")
        except LeadershipLostError:
            outcome.append("LeadershipLostError")
    Path(out).write_text("\n".join(outcome))


def test_a_paused_leader_is_replaced_and_cannot_write(cluster: EtcdCluster, tmp_path: Path) -> None:
    namespace = "/chaos/paused-leader/"
    context = multiprocessing.get_context("spawn")
    ready, resume = context.Event(), context.Event()
    out = str(tmp_path / "leader.txt")
    leader = spawn(_paused_leader, cluster.endpoints, namespace, ready, resume, out)
    try:
        assert ready.wait(timeout=30)
        os.kill(leader.pid or 0, signal.SIGSTOP)
        with EtcdPatterns.connect(cluster.endpoints, namespace=namespace) as other:
            stopped = time.monotonic()
            # Elected once the paused leader's lease expires.
            with other.elected("E", "successor", timeout=30) as leadership:
                taken = time.monotonic() - stopped
                other.transform("data", lambda _: "current leader", default="", guard=leadership)
                os.kill(leader.pid or 0, signal.SIGCONT)
                resume.set()
                leader.join(timeout=30)
                info = other.leader("E")
                assert info is not None
                assert (info.key, info.value) == (leadership.key, "successor")
            assert other.get_values("data") == ["current leader"]
    finally:
        if leader.is_alive():
            os.kill(leader.pid or 0, signal.SIGCONT)
            leader.join(timeout=30)
    outcome = Path(out).read_text().splitlines()
    print(f"leader replaced {taken:.1f}s after the pause; the paused leader saw {outcome}")
    assert outcome == ["lost", "proclaim rejected", "guarded write rejected", "LeadershipLostError"]
    assert leader.exitcode == 0


# -- an observer across a member kill -----------------------------------------------


def test_an_observer_sees_every_leader_across_a_leader_kill(cluster: EtcdCluster) -> None:
    namespace, changes, kill_at = "/chaos/observe/", 20, 10
    seen: list[str | None] = []
    changed = threading.Condition()

    def saw(value: str | None) -> Callable[[], bool]:
        return lambda: bool(seen) and seen[-1] == value

    with (
        EtcdPatterns.connect(cluster.endpoints, namespace=namespace, timeout=5) as observing,
        EtcdPatterns.connect(cluster.endpoints, namespace=namespace, timeout=5) as campaigning,
    ):

        def observe() -> None:
            for info in observing.observe("E", timeout=60):
                with changed:
                    seen.append(None if info is None else info.value)
                    changed.notify_all()
                if info is None and len(seen) > 1 and seen[-2] == f"leader {changes - 1}":
                    return

        observer = threading.Thread(target=observe)
        observer.start()
        killed = None
        delays: list[float] = []
        for i in range(changes):
            if i == kill_at:
                killed = cluster.leader()
                killed.kill()
            # Each leader stays until the observer has seen it.
            with campaigning.elected("E", f"leader {i}", timeout=30), changed:
                elected = time.monotonic()
                assert changed.wait_for(saw(f"leader {i}"), timeout=30), seen
                delays.append(time.monotonic() - elected)
        observer.join(timeout=30)
        assert not observer.is_alive()
    assert killed is not None
    assert not killed.running  # the fault fired: etcd's leader was down from then on
    leaders = [value for value in seen if value is not None]
    print(
        f"the observer saw {len(seen)} states, {len(leaders)} leaders; "
        f"slowest {max(delays):.2f}s, after the kill {delays[kill_at]:.2f}s"
    )
    assert leaders == [f"leader {i}" for i in range(changes)]
    assert seen[-1] is None  # the last state: nobody leads
    # Each seen through the watch, re-made on another member after the kill,
    # not through the read that follows a quiet RECHECK_INTERVAL.
    assert max(delays) < RECHECK_INTERVAL / 2, delays


# -- clients killed ---------------------------------------------------------------


def _hold_both(endpoints: list[str], namespace: str, ttl: int, ready: Any) -> None:
    etcd = EtcdPatterns.connect(endpoints, namespace=namespace)
    etcd.claim("q", ttl=ttl).__enter__()
    ready.set()  # a job claimed; now hold the lock, or queue for it
    etcd.locked("L", ttl=ttl).__enter__()
    threading.Event().wait()  # until SIGKILL


def test_killed_clients_release_locks_and_claims(cluster: EtcdCluster) -> None:
    namespace, ttl, clients = "/chaos/killed/", 2, 3
    context = multiprocessing.get_context("spawn")
    with EtcdPatterns.connect(cluster.endpoints, namespace=namespace) as etcd:
        etcd.enqueue_many("q", [f"job{i}" for i in range(clients)])
        readies = [context.Event() for _ in range(clients)]
        with Raw(cluster.endpoints, namespace) as raw:  # nothing is killed yet
            holders = [spawn(_hold_both, cluster.endpoints, namespace, ttl, readies[0])]
            wait_until(lambda: raw.count("L/") == 1)  # the first holds the lock
            # The others each claim a job, then queue behind the first.
            holders += [
                spawn(_hold_both, cluster.endpoints, namespace, ttl, r) for r in readies[1:]
            ]
            assert all(ready.wait(timeout=30) for ready in readies)
            wait_until(lambda: raw.count("L/") == clients)
            assert raw.count(".etcd-patterns/claims/") == clients  # every job claimed
        for process in holders:
            os.kill(process.pid or 0, signal.SIGKILL)
        killed = time.monotonic()
        etcd.lock("L", lambda: None, timeout=ttl + 10)
        jobs = etcd.dequeue_many("q", clients, timeout=ttl + 10)
        while len(jobs) < clients:
            jobs += etcd.dequeue_many("q", clients, timeout=ttl + 10)
        waited = time.monotonic() - killed
        for process in holders:
            process.join(timeout=10)
    print(f"lock and {clients} claimed jobs free {waited:.2f}s after SIGKILL (ttl={ttl}s)")
    assert sorted(jobs) == [f"job{i}" for i in range(clients)]
    assert waited <= freed_within(ttl)


# -- a lease that etcd still holds is never given up -------------------------------


def test_leader_kills_never_lose_a_lease_etcd_still_holds(cluster: EtcdCluster) -> None:
    # A new leader extends every lease by its TTL, so a short lease outlives
    # an election that takes longer than the TTL, as long as the client keeps
    # refreshing. A client that gave up locally would let it expire for real.
    ttl, kills = 2, 10
    with (
        EtcdPatterns.connect(cluster.endpoints, namespace="/chaos/lease/", session_ttl=ttl) as etcd,
        Raw(cluster.endpoints, "/chaos/lease/") as raw,
    ):
        etcd.enqueue("q", "job")
        holding = etcd.locked("L")
        held = holding.__enter__()
        claiming = etcd.claim("q")
        item = claiming.__enter__()
        session = held._session
        assert item.lost is session.lost  # one session carries both
        for _ in range(kills):
            leader = cluster.leader()
            leader.kill()
            killed = time.monotonic()
            # Until a refresh sent after the kill is confirmed, by a new leader.
            wait_until(
                lambda: session.confirmed_until > killed + ttl or session.lost.is_set(),  # noqa: B023
                timeout=30,
            )
            assert not session.lost.is_set()
            leader.restart()
        left = raw.client.leasestub.LeaseTimeToLive(
            etcdrpc.LeaseTimeToLiveRequest(ID=held.lease_id), 10
        ).TTL
        print(f"after {kills} leader kills, the ttl={ttl}s lease has {left}s left")
        assert left > 0  # etcd still holds it ...
        assert not session.lost.is_set()  # ... and so the library never gave it up
        assert held.is_owner()
        holding.__exit__(None, None, None)
        claiming.__exit__(None, None, None)  # acks: the claim was never lost
        assert raw.count("q/") == 0


# -- the whole cluster unreachable -------------------------------------------------


def test_whole_cluster_unreachable_then_back(cluster: EtcdCluster) -> None:
    timeout = 2.0
    with EtcdPatterns.connect(cluster.endpoints, namespace="/chaos/down/", timeout=timeout) as etcd:
        etcd.transform("n", incr, default="0")
        etcd.enqueue("q", "before")
        for node in cluster.nodes:
            node.kill()
        calls: dict[str, Callable[[], object]] = {
            "get_values": lambda: etcd.get_values("n"),
            "transform": lambda: etcd.transform("n", incr),
            "try_transform": lambda: etcd.try_transform("n", incr),
            "lock": lambda: etcd.lock("L", lambda: None, timeout=1),
            "try_lock": lambda: etcd.try_lock("L", lambda: None),
            "enqueue": lambda: etcd.enqueue("q", "during"),
            "dequeue": lambda: etcd.dequeue("q", timeout=1),
        }
        slowest = 0.0
        for name, call in calls.items():
            started = time.monotonic()
            # A write that timed out connecting may have been sent: unknown.
            with pytest.raises((EtcdUnavailableError, OutcomeUnknownError)):
                call()
            elapsed = time.monotonic() - started
            slowest = max(slowest, elapsed)
            # The instance's timeout bounds each call here (its own wait is
            # shorter), plus one late wake-up for the attempt that ran into
            # the deadline and one for the retry that found it expired.
            assert elapsed < timeout + 2 * SCHEDULING_GRACE, name
        print(f"with every member down, the slowest call failed after {slowest:.2f}s")
        for node in cluster.nodes:
            node.start(wait=False)
        for node in cluster.nodes:
            node.wait_healthy()
        assert etcd.transform("n", incr) == "2"
        assert etcd.dequeue("q", timeout=5) == "before"
        assert etcd.lock("L", lambda: "locked", timeout=5) == "locked"
