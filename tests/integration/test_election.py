"""Leader election against a real etcd: exclusion, order, failover, fencing, observers, etcdctl."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from etcd_patterns import (
    ElectionTimeoutError,
    EtcdPatterns,
    LeaderInfo,
    Leadership,
    LeadershipLostError,
    NotAnElectionError,
)
from etcd_patterns._wait import RECHECK_INTERVAL
from etcd_patterns.testing import EtcdCluster, ExternalEtcd, find_etcd_binary
from tests.helpers import (
    SCHEDULING_GRACE,
    Raw,
    freed_within,
    holder_to_kill,
    run_processes,
    wait_until,
    watchers,
)

Etcd = EtcdCluster | ExternalEtcd


def candidates(raw: Raw, name: str = "E") -> int:
    return raw.count(f"{name}/")


# -- basics -------------------------------------------------------------------


def test_elected_leads_then_resigns(patterns: EtcdPatterns, raw: Raw) -> None:
    assert patterns.leader("E") is None
    with patterns.elected("E", "host-1") as leadership:
        assert leadership.name == "E"
        assert leadership.key.startswith("E/")
        assert leadership.value == "host-1"
        assert leadership.is_leader()
        assert not leadership.lost.is_set()
        assert patterns.leader("E") == LeaderInfo(
            leadership.key, "host-1", leadership.fencing_token
        )
        assert raw.client.get(raw.key(leadership.key))[1].create_revision == (
            leadership.fencing_token
        )
    assert patterns.leader("E") is None
    assert candidates(raw) == 0
    assert not leadership.is_leader()


def test_proclaim_changes_the_value_only_while_leading(patterns: EtcdPatterns, raw: Raw) -> None:
    with patterns.elected("E", "v1") as leadership:
        leadership.proclaim("v2")
        assert leadership.value == "v2"
        info = patterns.leader("E")
        assert info is not None
        assert (info.value, info.fencing_token) == ("v2", leadership.fencing_token)
    before = raw.revision()
    with pytest.raises(LeadershipLostError) as raised:
        leadership.proclaim("v3")
    assert raised.value.name == "E"
    assert raw.revision() == before  # nothing written
    assert candidates(raw) == 0


def test_writes_guarded_by_the_leadership_apply_only_while_leading(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    with patterns.elected("E", "v") as leadership:
        patterns.transform("data", lambda _: "by the leader", default="", guard=leadership)
    with pytest.raises(LeadershipLostError):
        patterns.transform("data", lambda _: "stale", guard=leadership)
    assert raw.value("data") == b"by the leader"


def test_fencing_tokens_increase_across_leaders(patterns: EtcdPatterns) -> None:
    tokens = []
    for _ in range(3):
        with patterns.elected("E", "v") as leadership:
            tokens.append(leadership.fencing_token)
    assert tokens == sorted(set(tokens))


def test_candidates_are_elected_in_campaign_order(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    order: list[str] = []
    waiting = []

    def campaign(instance: EtcdPatterns, name: str) -> None:
        with instance.elected("E", name, timeout=30):
            order.append(name)

    with patterns.elected("E", "first"):
        for name in "ABC":
            instance = EtcdPatterns.connect(etcd.endpoints, namespace=namespace)
            thread = threading.Thread(target=campaign, args=(instance, name))
            thread.start()
            waiting.append((thread, instance))
            wait_until(lambda: candidates(raw) == len(waiting) + 1)
    for thread, instance in waiting:
        thread.join(timeout=30)
        instance.close()
    assert order == ["A", "B", "C"]


def test_a_resignation_never_deletes_the_next_leaders_key(
    patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    # The first leader's lease is revoked behind its back: the second is
    # elected; the first then resigns, and must delete nothing.
    first = patterns.elected("E", "first", ttl=30)
    leadership = first.__enter__()
    raw.client.revoke_lease(leadership.lease_id)
    with other.elected("E", "second", timeout=10) as second:
        with pytest.raises(LeadershipLostError):
            first.__exit__(None, None, None)
        assert second.is_leader()
        assert other.leader("E") == LeaderInfo(second.key, "second", second.fencing_token)


# -- giving up leaves nothing ---------------------------------------------------


def test_a_campaign_that_times_out_leaves_no_key(
    patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    with other.elected("warm", "up"):  # the session lease is granted before the clock starts
        pass
    with patterns.elected("E", "leader"):
        started = time.monotonic()
        with pytest.raises(ElectionTimeoutError):
            other.elected("E", "late", timeout=0.3).__enter__()
        # The timeout, then one last read and the withdrawal, each well within
        # a scheduling grace on loopback.
        assert time.monotonic() - started < 0.3 + SCHEDULING_GRACE
        assert candidates(raw) == 1  # only the leader's


@pytest.mark.timeout(60)
def test_an_interrupted_campaign_leaves_no_key(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    script = (
        "import faulthandler, signal, sys\n"
        # Python leaves SIGINT ignored if it started that way (a test run in
        # the background of a shell without job control); Ctrl-C is meant.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "faulthandler.dump_traceback_later(15, exit=True)\n"
        "from etcd_patterns import EtcdPatterns\n"
        "etcd = EtcdPatterns.connect(sys.argv[1], namespace=sys.argv[2])\n"
        "try:\n"
        "    with etcd.elected('E', 'waiting'):\n"
        "        pass\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
    )
    with patterns.elected("E", "leader"):
        waiter = subprocess.Popen(
            [sys.executable, "-c", script, ",".join(etcd.endpoints), namespace],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(lambda: candidates(raw) == 2)
        waiter.send_signal(signal.SIGINT)
        out, err = waiter.communicate(timeout=20)
        assert out.strip() == "interrupted", err
        assert candidates(raw) == 1  # only the leader's


def test_data_under_the_name_is_refused_not_waited_on(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("E/data", "not a candidate")
    with pytest.raises(NotAnElectionError, match="carries no lease"):
        patterns.elected("E", "v", timeout=5).__enter__()
    with pytest.raises(NotAnElectionError):
        patterns.leader("E")
    with pytest.raises(NotAnElectionError):
        next(patterns.observe("E"))
    assert candidates(raw) == 1  # the candidate withdrew: only the data is left


# -- observe --------------------------------------------------------------------


def test_observe_yields_the_leader_then_each_change(
    patterns: EtcdPatterns, other: EtcdPatterns
) -> None:
    changes = patterns.observe("E", timeout=10)
    assert next(changes) is None
    with other.elected("E", "a") as leadership:
        assert next(changes) == LeaderInfo(leadership.key, "a", leadership.fencing_token)
        leadership.proclaim("b")
        assert next(changes) == LeaderInfo(leadership.key, "b", leadership.fencing_token)
    assert next(changes) is None


def seen_after(
    etcd: Etcd,
    baseline: int,
    changes: Iterator[LeaderInfo | None],
    change: Callable[[], object],
) -> tuple[LeaderInfo | None, float]:
    """Make ``change`` while the observer waits on its watch; what it saw, and how soon.

    ``baseline`` is how many watchers etcd serves when no observer waits: the
    previous wait's watch is cancelled asynchronously, so its end is awaited
    before the count can tell that the next watch exists.
    """
    wait_until(lambda: watchers(etcd) <= baseline)
    before = watchers(etcd)
    seen: list[LeaderInfo | None] = []
    observer = threading.Thread(target=lambda: seen.append(next(changes)))
    observer.start()
    wait_until(lambda: watchers(etcd) > before)  # the observer watches
    changed = time.monotonic()
    change()
    observer.join(timeout=2 * RECHECK_INTERVAL)
    assert seen, "the observer saw nothing"
    return seen[0], time.monotonic() - changed


def test_an_observer_on_its_watch_wakes_for_each_change(
    etcd: Etcd, patterns: EtcdPatterns, other: EtcdPatterns
) -> None:
    baseline = watchers(etcd)
    changes = patterns.observe("E", timeout=3 * RECHECK_INTERVAL)
    assert next(changes) is None
    holding = other.elected("E", "a")
    leadership: list[Leadership] = []
    woken = [seen_after(etcd, baseline, changes, lambda: leadership.append(holding.__enter__()))]
    (mine,) = leadership
    woken.append(seen_after(etcd, baseline, changes, lambda: mine.proclaim("b")))
    woken.append(seen_after(etcd, baseline, changes, lambda: holding.__exit__(None, None, None)))
    token = mine.fencing_token
    assert [info for info, _ in woken] == [
        LeaderInfo(mine.key, "a", token),
        LeaderInfo(mine.key, "b", token),
        None,
    ]
    # Woken by the watch: one event and one read, not the read that follows
    # a quiet RECHECK_INTERVAL.
    assert all(after < SCHEDULING_GRACE for _, after in woken), woken


def test_observe_times_out_without_a_change(patterns: EtcdPatterns) -> None:
    changes = patterns.observe("E", timeout=0.2)
    assert next(changes) is None
    with pytest.raises(ElectionTimeoutError):
        next(changes)


def test_an_observer_coalesces_but_never_misses_the_latest_state(
    patterns: EtcdPatterns, other: EtcdPatterns
) -> None:
    changes = patterns.observe("E", timeout=10)
    assert next(changes) is None
    with other.elected("E", "a") as leadership:
        for value in "bcdefg":  # faster than the observer reads
            leadership.proclaim(value)
        seen = next(changes)
        while seen is not None and seen.value != "g":
            seen = next(changes)
        assert seen == LeaderInfo(leadership.key, "g", leadership.fencing_token)


# -- processes ------------------------------------------------------------------


def _append(line: str) -> Callable[[str], str]:
    return lambda value: value + line + "\n"


def _exclusion_worker(
    endpoints: list[str], namespace: str, rounds: int, log: str, start: Any
) -> None:
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd:
        start.wait(timeout=60)
        for _ in range(rounds):
            with etcd.elected("E", f"pid {os.getpid()}", timeout=120) as leadership:
                token = leadership.fencing_token
                began = time.monotonic_ns()
                # Markers written through the leadership's fence: etcd applies
                # them only while this process leads.
                etcd.transform("log", _append(f"{token} begin"), default="", guard=leadership)
                etcd.transform("log", _append(f"{token} end"), guard=leadership)
                ended = time.monotonic_ns()
            with open(log, "a") as out:
                out.write(f"{token} {began} {ended}\n")


@pytest.mark.timeout(180)
def test_one_leader_at_a_time_across_processes(
    etcd: Etcd, namespace: str, raw: Raw, tmp_path: Path
) -> None:
    processes, rounds = 4, 10
    log = tmp_path / "intervals.log"
    run_processes(_exclusion_worker, (etcd.endpoints, namespace, rounds, str(log)), processes)
    markers = (raw.value("log") or b"").decode().splitlines()
    assert len(markers) == 2 * processes * rounds
    # Each leader's markers are adjacent, begin then end, in token order.
    pairs = [(markers[i], markers[i + 1]) for i in range(0, len(markers), 2)]
    tokens = [int(begin.split()[0]) for begin, _ in pairs]
    assert all(
        begin.endswith(" begin") and end == begin.replace("begin", "end") for begin, end in pairs
    )
    assert tokens == sorted(set(tokens))
    # And by the clock: no two leadership intervals overlap.
    intervals = sorted(
        (int(began), int(ended))
        for _, began, ended in (line.split() for line in log.read_text().splitlines())
    )
    assert len(intervals) == processes * rounds
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(intervals))


def _lead_and_hang(endpoints: list[str], namespace: str, ttl: int, ready: Any) -> None:
    etcd = EtcdPatterns.connect(endpoints, namespace=namespace)
    etcd.elected("E", "doomed", ttl=ttl).__enter__()
    ready.set()
    threading.Event().wait()  # until SIGKILL


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_killed_leader_is_replaced_within_its_ttl(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns
) -> None:
    ttl = 2
    with holder_to_kill(_lead_and_hang, etcd.endpoints, namespace, ttl) as kill:
        info = patterns.leader("E")
        assert info is not None
        assert info.value == "doomed"
        killed = kill()
        with patterns.elected("E", "successor", timeout=ttl + 10) as leadership:
            elected_after = time.monotonic() - killed
            assert leadership.fencing_token > info.fencing_token
    print(f"new leader {elected_after:.2f}s after SIGKILL (ttl={ttl}s)")
    assert elected_after <= freed_within(ttl)


# -- etcdctl --------------------------------------------------------------------


def etcdctl(etcd: Etcd, *args: str, **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [find_etcd_binary("etcdctl"), f"--endpoints={','.join(etcd.endpoints)}", *args],
        text=True,
        **popen,
    )


@pytest.fixture
def stopping() -> Iterator[list[subprocess.Popen[str]]]:
    """etcdctl processes to interrupt (as Ctrl-C would) at the end of the test."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        process.communicate(timeout=20)


@pytest.mark.timeout(60)
def test_etcdctl_sees_our_leader_and_waits_behind_it(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw, stopping: list[Any]
) -> None:
    before = watchers(etcd)
    with patterns.elected("E", "ours") as leadership:
        listener = etcdctl(etcd, "elect", "-l", namespace + "E", stdout=subprocess.PIPE)
        stopping.append(listener)
        assert listener.stdout is not None
        # etcdctl prints the leader's key, then its value.
        assert listener.stdout.readline().strip() == namespace + leadership.key
        assert listener.stdout.readline().strip() == "ours"
        candidate = etcdctl(etcd, "elect", namespace + "E", "theirs", stdout=subprocess.PIPE)
        stopping.append(candidate)
        wait_until(lambda: candidates(raw) == 2)  # etcdctl is queued behind us
        # The listener watches our key; Go's Election watches its
        # predecessor once it found it does not lead: from then on, it
        # cannot be elected before we resign.
        wait_until(lambda: watchers(etcd) >= before + 2)
        assert candidate.poll() is None
        info = patterns.leader("E")
        assert info is not None
        assert info.value == "ours"
    # Once we resign, etcdctl is elected, and prints its key.
    assert candidate.stdout is not None
    their_key = candidate.stdout.readline().strip()
    assert their_key.startswith(namespace + "E/")
    info = patterns.leader("E")
    assert info is not None
    assert (namespace + info.key, info.value) == (their_key, "theirs")


@pytest.mark.timeout(60)
def test_we_wait_behind_etcdctls_leader_and_take_over_when_it_exits(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw, stopping: list[Any]
) -> None:
    leader = etcdctl(etcd, "elect", namespace + "E", "theirs", stdout=subprocess.PIPE)
    stopping.append(leader)
    assert leader.stdout is not None
    their_key = leader.stdout.readline().strip()  # printed once elected
    info = patterns.leader("E")
    assert info is not None
    assert (namespace + info.key, info.value) == (their_key, "theirs")
    with pytest.raises(ElectionTimeoutError):
        patterns.elected("E", "ours", timeout=0.5).__enter__()
    elected = threading.Event()
    ours: list[str] = []

    def campaign() -> None:
        with patterns.elected("E", "ours", timeout=30) as leadership:
            ours.append(leadership.key)
            elected.set()

    campaigner = threading.Thread(target=campaign)
    campaigner.start()
    wait_until(lambda: candidates(raw) == 2)
    assert not elected.is_set()
    leader.send_signal(signal.SIGINT)  # etcdctl resigns as it exits
    assert elected.wait(timeout=20)
    campaigner.join(timeout=20)
    assert leader.wait(timeout=20) == 0 or leader.returncode == -signal.SIGINT


# -- cost -----------------------------------------------------------------------


def test_costs_in_round_trips(etcd: Etcd, patterns: EtcdPatterns) -> None:
    with patterns.elected("E", "v"):  # the session lease is granted once, on first use
        pass
    with etcd.count_rpcs() as rpcs, patterns.elected("E", "v"):
        pass
    assert rpcs.requests == {"etcdserverpb.KV/Txn": 2}
    with etcd.count_rpcs() as rpcs:
        patterns.leader("E")
    assert rpcs.requests == {"etcdserverpb.KV/Range": 1}
    with patterns.elected("E", "v") as leadership:
        with etcd.count_rpcs() as rpcs:
            leadership.is_leader()
        assert rpcs.requests == {"etcdserverpb.KV/Range": 1}
        with etcd.count_rpcs() as rpcs:
            leadership.proclaim("w")
        assert rpcs.requests == {"etcdserverpb.KV/Txn": 1}
