"""lock / try_lock against a real etcd: exclusion, fairness, crashes, fencing."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from etcd_patterns import (
    EtcdPatterns,
    LockLostError,
    LockReentryError,
    LockTimeoutError,
    NotALockError,
)
from etcd_patterns.testing import EtcdCluster, ExternalEtcd, find_etcd_binary
from tests.helpers import (
    Raw,
    freed_within,
    holder_to_kill,
    run_processes,
    run_together,
    wait_until,
    watchers,
)

Etcd = EtcdCluster | ExternalEtcd


def contenders(raw: Raw, name: str = "L") -> int:
    return raw.count(f"{name}/")


# -- basics -------------------------------------------------------------------


def test_lock_runs_the_block_and_releases(patterns: EtcdPatterns, raw: Raw) -> None:
    assert patterns.lock("L", lambda: contenders(raw)) == 1
    assert contenders(raw) == 0


def test_a_raising_block_releases_and_propagates(patterns: EtcdPatterns, raw: Raw) -> None:
    def fail() -> None:
        raise ValueError("in the block")

    with pytest.raises(ValueError, match="in the block"):
        patterns.lock("L", fail)
    assert contenders(raw) == 0


def test_try_lock_while_held_does_not_run_the_block(
    patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    called: list[int] = []
    with patterns.locked("L"):
        before = raw.revision()
        result = other.try_lock("L", lambda: called.append(1))
        assert raw.revision() == before  # a failed try_lock writes nothing
        with other.try_locked("L") as held:
            assert held is None
    assert result.acquired is False
    assert result.value is None
    assert result.revision == before
    assert called == []
    acquired = other.try_lock("L", lambda: "ran")
    assert acquired.acquired
    assert acquired.value == "ran"


def test_the_handle(patterns: EtcdPatterns, raw: Raw) -> None:
    with patterns.locked("L") as held:
        assert held.name == "L"
        assert held.key.startswith("L/")
        kv = raw.get(held.key)
        assert kv.create_revision == held.fencing_token
        assert kv.lease == held.lease_id
        assert held.is_owner()
        assert not held.lost.is_set()
    assert not held.is_owner()


def test_fencing_tokens_increase_across_holders(
    patterns: EtcdPatterns, other: EtcdPatterns
) -> None:
    tokens = []
    for instance in (patterns, other, patterns, other):
        with instance.locked("L") as held:
            tokens.append(held.fencing_token)
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 4


def test_same_thread_reacquire_raises(patterns: EtcdPatterns, raw: Raw) -> None:
    with patterns.locked("L"):
        with pytest.raises(LockReentryError):
            patterns.lock("L", lambda: None)
        with pytest.raises(RuntimeError, match="re-entrant"):
            patterns.try_lock("L", lambda: None)
        assert contenders(raw) == 1
    patterns.lock("L", lambda: None)  # released: the name is free again


def test_a_lock_named_after_a_value_is_refused(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("data", "v")
    before = raw.revision()
    with pytest.raises(NotALockError):
        patterns.lock("data", lambda: None)
    with pytest.raises(ValueError, match="holds a value"):
        patterns.try_lock("data", lambda: None)
    assert raw.revision() == before


def test_timeout_leaves_no_key_behind(
    patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    with patterns.locked("L"):
        with pytest.raises(LockTimeoutError) as info:
            other.lock("L", lambda: None, timeout=0.3)
        assert isinstance(info.value, TimeoutError)
        assert contenders(raw) == 1
        with pytest.raises(LockTimeoutError):
            other.lock("L", lambda: None, timeout=0)
        assert contenders(raw) == 1


def test_threads_sharing_an_instance_exclude_each_other(patterns: EtcdPatterns, raw: Raw) -> None:
    inside = 0
    overlaps = 0
    guard = threading.Lock()

    def critical() -> None:
        nonlocal inside, overlaps
        with guard:
            inside += 1
            overlaps += inside > 1
        value = int(raw.value("n") or b"0")
        raw.put("n", str(value + 1))
        with guard:
            inside -= 1

    def work() -> None:
        for _ in range(10):
            patterns.lock("L", critical)

    run_together([work] * 4, timeout=60)
    assert overlaps == 0
    assert raw.value("n") == b"40"


def test_waiters_acquire_in_arrival_order(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    order: list[str] = []
    waiters = []
    with patterns.locked("L"):
        for name in "ABC":
            instance = EtcdPatterns.connect(etcd.endpoints, namespace=namespace)
            thread = threading.Thread(
                target=instance.lock, args=("L", lambda name=name: order.append(name))
            )
            thread.start()
            waiters.append((thread, instance))
            wait_until(lambda: contenders(raw) == len(waiters) + 1)
    for thread, instance in waiters:
        thread.join(timeout=30)
        instance.close()
    assert order == ["A", "B", "C"]


# -- processes ------------------------------------------------------------------


def _exclusion_worker(
    endpoints: list[str], namespace: str, rounds: int, log: str, start: Any
) -> None:
    with (
        EtcdPatterns.connect(endpoints, namespace=namespace) as etcd,
        Raw(endpoints, namespace) as raw,
    ):

        def critical() -> None:
            began = time.monotonic_ns()
            value = int(raw.value("counter") or b"0")  # a plain read...
            raw.put("counter", str(value + 1))  # ...then a plain write
            ended = time.monotonic_ns()
            with open(log, "a") as out:
                out.write(f"{os.getpid()} {began} {ended}\n")

        start.wait(timeout=60)
        for _ in range(rounds):
            etcd.lock("mutex", critical)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_mutual_exclusion_across_processes(
    etcd: Etcd, namespace: str, raw: Raw, tmp_path: Path
) -> None:
    processes, rounds = 4, 25
    log = tmp_path / "intervals.log"
    run_processes(_exclusion_worker, (etcd.endpoints, namespace, rounds, str(log)), processes)
    assert raw.value("counter") == str(processes * rounds).encode()
    intervals = sorted(
        (int(began), int(ended))
        for _, began, ended in (line.split() for line in log.read_text().splitlines())
    )
    assert len(intervals) == processes * rounds
    overlapping = [(a, b) for a, b in itertools.pairwise(intervals) if b[0] < a[1]]
    assert overlapping == []


def _hold_and_hang(endpoints: list[str], namespace: str, ttl: int, ready: Any) -> None:
    etcd = EtcdPatterns.connect(endpoints, namespace=namespace)
    etcd.locked("L", ttl=ttl).__enter__()
    ready.set()
    threading.Event().wait()  # until SIGKILL


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_killed_holder_frees_the_lock_within_ttl(
    etcd: EtcdCluster | ExternalEtcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    ttl = 2
    with holder_to_kill(_hold_and_hang, etcd.endpoints, namespace, ttl) as kill:
        assert patterns.try_lock("L", lambda: None).acquired is False
        killed = kill()
        acquired_at = patterns.lock("L", time.monotonic, timeout=ttl + 10)
    waited = acquired_at - killed
    print(f"lock freed {waited:.2f}s after SIGKILL (ttl={ttl}s)")
    assert waited <= freed_within(ttl)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_block_outliving_the_ttl_keeps_the_lock(
    patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    ttl = 2
    released_at: list[float] = []
    acquired_at: list[float] = []
    contender = threading.Thread(
        target=lambda: acquired_at.append(other.lock("L", time.monotonic, timeout=30))
    )
    with patterns.locked("L", ttl=ttl) as held:
        contender.start()
        wait_until(lambda: contenders(raw) == 2)
        threading.Event().wait(3 * ttl)  # the block runs three TTLs long
        assert held.is_owner()
        assert not held.lost.is_set()
        assert not acquired_at
        released_at.append(time.monotonic())
    contender.join(timeout=30)
    assert acquired_at
    assert acquired_at[0] >= released_at[0]


class _LostAtLogTime(logging.Handler):
    """Records, for each record naming a lease, whether `lost` was set when it was logged."""

    def __init__(self, lease_id: int, lost: threading.Event) -> None:
        super().__init__(logging.WARNING)
        self.lease = f"{lease_id:x}"
        self.lost = lost
        self.seen: list[bool] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.lease in record.getMessage():
            self.seen.append(self.lost.is_set())


@pytest.mark.timeout(60)
def test_a_lost_lease_is_logged_before_it_is_signalled(patterns: EtcdPatterns, raw: Raw) -> None:
    # Whoever wakes on `lost` (a test, a monitoring thread) finds the
    # warning already written.
    logger = logging.getLogger("etcd_patterns")
    holding = patterns.locked("L", ttl=3)
    held = holding.__enter__()
    probe = _LostAtLogTime(held.lease_id, held.lost)
    logger.addHandler(probe)
    try:
        raw.revoke(held.lease_id)
        assert held.lost.wait(timeout=10)
    finally:
        logger.removeHandler(probe)
    assert probe.seen == [False]
    with pytest.raises(LockLostError):
        holding.__exit__(None, None, None)


@pytest.mark.timeout(60)
def test_lease_loss_while_holding(
    patterns: EtcdPatterns, raw: Raw, caplog: pytest.LogCaptureFixture
) -> None:
    raw.put("data", "before")
    holding = patterns.locked("L", ttl=3)
    held = holding.__enter__()
    raw.revoke(held.lease_id)  # the lease dies under the holder
    assert held.lost.wait(timeout=10)
    assert [r.levelname for r in caplog.records if f"{held.lease_id:x}" in r.getMessage()] == [
        "WARNING"
    ]
    assert not held.is_owner()
    with pytest.raises(LockLostError):
        patterns.transform("data", lambda v: "stale write", guard=held)
    with pytest.raises(LockLostError):
        patterns.try_transform("data", lambda v: "stale write", guard=held)
    assert raw.value("data") == b"before"
    with pytest.raises(LockLostError):
        holding.__exit__(None, None, None)
    assert patterns.lock("L", lambda: "a fresh session", ttl=3) == "a fresh session"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["lock", "try_lock"])
def test_a_loss_is_reported_with_the_blocks_result(
    patterns: EtcdPatterns, raw: Raw, call: str
) -> None:
    def block() -> str:
        ((_, meta),) = raw.client.get_prefix(raw.key("L/"))
        raw.revoke(meta.lease_id)
        return "done"

    with pytest.raises(LockLostError) as info:
        getattr(patterns, call)("L", block)
    assert info.value.result == "done"
    assert info.value.name == "L"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_leaving_locked_while_the_block_raises_keeps_the_blocks_error(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    # The lock was lost too, but the block's own error is what the caller
    # must see; the loss is not raised over it.
    def block() -> None:
        with patterns.locked("L") as held:
            raw.revoke(held.lease_id)
            assert held.lost.wait(timeout=10)
            _ = 1 / 0

    with pytest.raises(ZeroDivisionError):
        block()
    assert raw.count("L/") == 0


def test_guarded_writes(patterns: EtcdPatterns, raw: Raw) -> None:
    with patterns.locked("L") as held:
        assert patterns.transform("data", lambda v: "guarded", default="", guard=held) == "guarded"
        succeeded, _ = raw.client.transaction(
            compare=[held.guard()],
            success=[raw.client.transactions.put(raw.key("x"), "1")],
            failure=[],
        )
        assert succeeded
    succeeded, _ = raw.client.transaction(
        compare=[held.guard()], success=[raw.client.transactions.put(raw.key("x"), "2")], failure=[]
    )
    assert not succeeded
    with pytest.raises(LockLostError):
        patterns.transform("data", lambda v: "late", guard=held)
    assert raw.value("data") == b"guarded"
    assert raw.value("x") == b"1"


# -- interoperation with etcdctl ------------------------------------------------


def etcdctl(etcd: Etcd, *args: str, **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [find_etcd_binary("etcdctl"), f"--endpoints={','.join(etcd.endpoints)}", *args],
        text=True,
        **popen,
    )


@pytest.mark.timeout(60)
def test_etcdctl_lock_excludes_us(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw, tmp_path: Path
) -> None:
    # etcdctl gives its command no stdin, so the command waits on a FIFO
    # instead: it holds the lock until the test opens the FIFO and closes it.
    release = tmp_path / "release"
    os.mkfifo(release)
    holder = etcdctl(
        etcd,
        "lock",
        namespace + "L",
        "--",
        sys.executable,
        "-c",
        "import os, sys; print(os.environ['ETCD_LOCK_KEY'], flush=True); open(sys.argv[1]).read()",
        str(release),
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None
    try:
        lock_key = holder.stdout.readline().strip()
        assert lock_key.startswith(namespace + "L/")
        assert raw.client.get(lock_key)[1] is not None  # etcdctl's key is there
        assert patterns.try_lock("L", lambda: None).acquired is False
        with pytest.raises(LockTimeoutError):
            patterns.lock("L", lambda: None, timeout=0.5)
    finally:
        with open(release, "w"):
            pass
    assert holder.wait(timeout=20) == 0
    holder.stdout.close()
    assert patterns.lock("L", lambda: "ours", timeout=10) == "ours"


@pytest.mark.timeout(60)
def test_we_exclude_etcdctl_lock(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw, tmp_path: Path
) -> None:
    # etcdctl's command leaves a marker when it runs: it must not run while
    # we hold the lock, and must once we release it.
    marker = tmp_path / "ran"
    command = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').close()", str(marker)]
    with patterns.locked("L"):
        before = watchers(etcd)
        waiter = etcdctl(etcd, "lock", namespace + "L", "--", *command)
        wait_until(lambda: contenders(raw) == 2)  # etcdctl is queued behind us
        # Go's Mutex watches its predecessor only once it found it does not
        # hold the lock: from then on it cannot run its command before we go.
        wait_until(lambda: watchers(etcd) > before)
        assert not marker.exists()
        assert waiter.poll() is None
    assert waiter.wait(timeout=20) == 0
    assert marker.exists()


@pytest.mark.timeout(60)
def test_a_lock_name_ending_with_a_slash_is_etcdctls_too(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    # etcdctl and Go's Mutex accept "/my-lock/": contenders "/my-lock//<lease>".
    with patterns.locked("my-lock/") as held:
        assert held.key.startswith("my-lock//")
        before = watchers(etcd)
        waiter = etcdctl(
            etcd, "lock", namespace + "my-lock/", "--", "echo", "acquired", stdout=subprocess.PIPE
        )
        wait_until(lambda: raw.count("my-lock//") == 2)  # etcdctl is queued behind us
        wait_until(lambda: watchers(etcd) > before)  # and waits for us, as above
        assert waiter.poll() is None
    out, _ = waiter.communicate(timeout=20)
    assert waiter.returncode == 0
    assert out.strip() == "acquired"
    assert raw.count("my-lock//") == 0


@pytest.mark.timeout(30)
def test_a_new_thread_with_a_dead_threads_ident_is_not_a_reentry(patterns: EtcdPatterns) -> None:
    holders: list[Any] = []
    first = threading.Thread(target=lambda: holders.append(patterns.locked("L").__enter__()))
    first.start()
    first.join()  # it ended holding the lock
    idents = [first.ident]
    second_saw: list[BaseException] = []

    def second_thread() -> None:
        idents.append(threading.get_ident())
        try:
            patterns.lock("L", lambda: None, timeout=0.5)
        except BaseException as exc:  # checked by the test's thread
            second_saw.append(exc)

    second = threading.Thread(target=second_thread)
    second.start()
    second.join()
    if idents[0] != idents[1]:
        pytest.skip("the platform did not reuse the thread ident this time")
    # The lock is held (by the dead thread's handle): waiting for it is right,
    # a re-entry error is not.
    assert [type(error) for error in second_saw] == [LockTimeoutError]


@pytest.mark.timeout(30)
def test_data_under_a_locks_name_is_refused_not_waited_on(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("billing/last-run", "yesterday")  # no lease: data, not a contender
    with pytest.raises(NotALockError, match="billing/last-run"):
        patterns.lock("billing", lambda: None, timeout=5)
    with pytest.raises(NotALockError, match="billing/last-run"):
        patterns.try_lock("billing", lambda: None)
    assert raw.count("billing/") == 1  # only the data: the contender withdrew


@pytest.mark.timeout(30)
def test_data_queued_before_a_waiter_is_refused_while_a_holder_holds(
    patterns: EtcdPatterns, other: EtcdPatterns, raw: Raw
) -> None:
    with patterns.locked("L"):
        raw.put("L/data", "x")  # created after the holder's key
        with pytest.raises(NotALockError, match="L/data"):
            other.lock("L", lambda: None, timeout=20)
        assert contenders(raw) == 2  # the holder's key and the data
    assert contenders(raw) == 1


# -- Ctrl-C while waiting -------------------------------------------------------


@pytest.mark.timeout(60)
def test_an_interrupted_waiter_withdraws(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    script = (
        "import faulthandler, signal, sys\n"
        # Python leaves SIGINT ignored if it started that way (a test run in
        # the background of a shell without job control); Ctrl-C is meant.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        # A waiter that hangs shows where, instead of running into the timeout.
        "faulthandler.dump_traceback_later(15, exit=True)\n"
        "from etcd_patterns import EtcdPatterns\n"
        "etcd = EtcdPatterns.connect(sys.argv[1], namespace=sys.argv[2])\n"
        "try:\n"
        "    etcd.lock('L', lambda: None)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
    )
    with patterns.locked("L"):
        waiter = subprocess.Popen(
            [sys.executable, "-c", script, ",".join(etcd.endpoints), namespace],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(lambda: contenders(raw) == 2)
        waiter.send_signal(signal.SIGINT)
        out, err = waiter.communicate(timeout=20)
        assert out.strip() == "interrupted", err
        assert contenders(raw) == 1  # only ours: the waiter took its key away


# -- cost -----------------------------------------------------------------------


def test_an_uncontended_cycle_is_two_round_trips(etcd: Etcd, patterns: EtcdPatterns) -> None:
    patterns.lock("L", lambda: None)  # the session lease is granted once, on first use
    with etcd.count_rpcs() as rpcs:
        patterns.lock("L", lambda: None)
    assert rpcs.requests == {"etcdserverpb.KV/Txn": 2}
    with etcd.count_rpcs() as rpcs:
        patterns.try_lock("L", lambda: None)
    assert rpcs.requests == {"etcdserverpb.KV/Txn": 2}


@pytest.mark.timeout(60)
def test_a_waiter_far_back_watches_from_its_read_and_reads_no_more(
    etcd: Etcd, namespace: str, raw: Raw
) -> None:
    """Only a waiter with three keys ahead watches from its read: its predecessor must win first."""
    names = ["second", "third", "fourth"]
    holder, *waiting = (EtcdPatterns.connect(etcd.endpoints, namespace=namespace) for _ in range(4))
    creates: dict[str, list[int]] = {who: [] for who in names}
    order: list[str] = []

    def queue_up(who: str, instance: EtcdPatterns) -> threading.Thread:
        original = instance._transport.watch

        def counted(requests: Any, **kwargs: Any) -> Any:
            creates[who].append(len(requests))
            return original(requests, **kwargs)

        instance._transport.watch = counted  # type: ignore[method-assign,assignment]
        waiter = threading.Thread(target=instance.lock, args=("L", lambda: order.append(who)))
        waiter.start()
        wait_until(lambda: len(creates[who]) == 1)  # watching: in line
        return waiter

    try:
        with holder.locked("L"):
            waiters = [
                queue_up(who, instance) for who, instance in zip(names, waiting, strict=True)
            ]
        for waiter in waiters:
            waiter.join(timeout=30)
    finally:
        for instance in (holder, *waiting):
            instance.close()
    assert order == names
    assert contenders(raw) == 0
    # One watch on the key ahead, for the second and third in line; two for
    # the fourth, from the current revision and from its registration's,
    # on one stream.
    assert creates == {"second": [1], "third": [1], "fourth": [2]}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [2, 8])
def test_contended_cost_per_acquisition_is_constant(
    etcd: Etcd, namespace: str, workers: int
) -> None:
    rounds = 10
    instances = [EtcdPatterns.connect(etcd.endpoints, namespace=namespace) for _ in range(workers)]
    for instance in instances:
        instance.lock("warm-up", lambda: None)

    def work(instance: EtcdPatterns) -> Callable[[], None]:
        def loop() -> None:
            for _ in range(rounds):
                instance.lock("L", lambda: None)

        return loop

    with etcd.count_rpcs() as rpcs:
        run_together([work(instance) for instance in instances])
    for instance in instances:
        instance.close()
    per_acquisition = (rpcs.kv + rpcs.total("etcdserverpb.Watch")) / (workers * rounds)
    print(f"{workers} contenders: {per_acquisition:.2f} RPCs per acquisition, {dict(rpcs.counts)}")
    # register, watch, a re-read if etcd moved on before the watch existed
    # (only for a waiter with one or two keys ahead), the
    # re-read after the predecessor left, release: at most 5, whatever the
    # number of waiters.
    assert 2 <= per_acquisition <= 5
