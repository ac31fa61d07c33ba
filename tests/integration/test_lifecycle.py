"""Closing, and what happens when etcd is unreachable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from etcd_patterns import ClosedError, EtcdPatterns, EtcdUnavailableError
from etcd_patterns._transport import CLEANUP_TIMEOUT
from etcd_patterns.testing import EtcdCluster, ExternalEtcd, free_ports
from tests.helpers import SCHEDULING_GRACE, Raw


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_close_stops_every_thread_revokes_the_lease_and_prints_nothing(
    etcd: EtcdCluster | ExternalEtcd, namespace: str, raw: Raw
) -> None:
    result = run_python(
        """
        import sys, threading
        from etcd_patterns import EtcdPatterns

        patterns = EtcdPatterns.connect(sys.argv[1], namespace=sys.argv[2])
        patterns.transform("k", lambda v: v + "x", default="")
        holding = patterns.locked("L")
        held = holding.__enter__()
        waiter = threading.Thread(target=patterns.lock, args=("L", lambda: None))
        waiter.start()  # waits on a watch stream until the holder lets go
        patterns.lock("other", lambda: None, ttl=30)  # a second session
        holding.__exit__(None, None, None)
        waiter.join()
        held_again = patterns.locked("L").__enter__()  # still held when closing
        ours = [t.name for t in threading.enumerate() if t.name.startswith("etcd-patterns")]
        patterns.close()
        patterns.close()
        for thread in threading.enumerate():
            if thread is not threading.main_thread():
                thread.join(timeout=5)
        others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        print("ours-before", len(ours))
        print("alive-after", others)
        """,
        ",".join(etcd.endpoints),
        namespace,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["ours-before"] == "2"  # two sessions: the check below is not vacuous
    assert lines["alive-after"] == "[]"
    assert raw.value("k") == b"x"
    assert raw.count(".etcd-patterns/") == 0  # the session's keys went with its lease
    assert raw.count("L/") == 0  # and so did the lock still held at close


def test_an_instance_never_closed_frees_what_it_held_at_exit(
    etcd: EtcdCluster | ExternalEtcd, namespace: str, raw: Raw
) -> None:
    result = run_python(
        """
        import sys
        from etcd_patterns import EtcdPatterns

        patterns = EtcdPatterns.connect(sys.argv[1], namespace=sys.argv[2])
        patterns.locked("L").__enter__()
        patterns.lock("other", lambda: None, ttl=30)  # a second session
        print(patterns.get_values("L")[0] != "", flush=True)
        """,
        ",".join(etcd.endpoints),
        namespace,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"  # it held the lock
    assert result.stderr == ""
    # The default session lease lives 10 s: only a revoke at exit frees these now.
    assert raw.count("L/") == 0
    assert raw.count(".etcd-patterns/") == 0


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_close_with_etcd_gone_is_quiet_and_bounded() -> None:
    result = run_python(
        """
        import threading, time
        from etcd_patterns import EtcdPatterns
        from etcd_patterns.testing import EtcdCluster

        with EtcdCluster() as cluster:
            patterns = EtcdPatterns.connect(cluster.endpoints, timeout=1)
            patterns.transform("k", lambda v: v, default="")
            cluster.nodes[0].kill()
            started = time.monotonic()
            patterns.close()
            print("close-seconds", round(time.monotonic() - started, 2))
            others = [t for t in threading.enumerate() if t is not threading.main_thread()]
            print("alive-after", [t.name for t in others])
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    # Each step of close is bounded: the keepalive thread's join (a refresh
    # interval plus CLEANUP_TIMEOUT), the lease revoke and the client's
    # close (CLEANUP_TIMEOUT each). With the member dead, each fails fast.
    session_ttl = 10  # the instance's default
    bound = session_ttl / 3 + 3 * CLEANUP_TIMEOUT
    assert float(lines["close-seconds"]) < bound
    assert lines["alive-after"] == "[]"


def test_a_wrapped_client_stays_open(etcd: EtcdCluster | ExternalEtcd, raw: Raw) -> None:
    import etcd3

    host, port = etcd.endpoints[0].rsplit(":", 1)
    client = etcd3.client(host=host, port=int(port), timeout=5)
    with EtcdPatterns(client, namespace=raw.namespace) as patterns:
        patterns.transform("k", lambda v: "v", default="")
    assert client.get(raw.key("k"))[0] == b"v"
    client.close()


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.get_values("k"),
        lambda p: p.transform("k", lambda v: v + "x"),
        lambda p: p.lock("L", lambda: None, timeout=1),
        lambda p: p.enqueue("q", "job"),
        lambda p: p.dequeue("empty", timeout=1),  # a wait: a watch on the closed channel
    ],
    ids=["get_values", "transform", "lock", "enqueue", "dequeue"],
)
def test_a_client_the_user_closed_gives_closed_error(
    etcd: EtcdCluster | ExternalEtcd, raw: Raw, call: Callable[[EtcdPatterns], object]
) -> None:
    import etcd3

    host, port = etcd.endpoints[0].rsplit(":", 1)
    client = etcd3.client(host=host, port=int(port), timeout=5)
    with EtcdPatterns(client, namespace=raw.namespace) as patterns:
        patterns.transform("k", lambda v: "v", default="")
        client.close()
        with pytest.raises(ClosedError, match="client was closed"):
            call(patterns)


@pytest.mark.parametrize("when", ["before the watch", "during the watch"])
@pytest.mark.timeout(30)
def test_closing_the_users_client_under_a_wait_gives_closed_error(
    etcd: EtcdCluster | ExternalEtcd, raw: Raw, when: str
) -> None:
    import etcd3

    host, port = etcd.endpoints[0].rsplit(":", 1)
    client = etcd3.client(host=host, port=int(port), timeout=5)
    with EtcdPatterns(client, namespace=raw.namespace) as patterns:
        waiting = threading.Event()
        original = patterns._transport.watch

        def watch(*args: Any, **kwargs: Any) -> Any:
            if when == "before the watch":
                client.close()  # between the read that found nothing and the watch
            waiting.set()
            return original(*args, **kwargs)

        patterns._transport.watch = watch  # type: ignore[method-assign]
        outcome: list[BaseException] = []

        def consume() -> None:
            try:
                patterns.dequeue("empty", timeout=20)
            except BaseException as exc:  # reported by the test's thread
                outcome.append(exc)

        consumer = threading.Thread(target=consume)
        consumer.start()
        assert waiting.wait(timeout=10)
        client.close()
        consumer.join(timeout=20)
        assert not consumer.is_alive()
        assert [type(error) for error in outcome] == [ClosedError]


def _enter(context: Any) -> object:
    with context as handle:
        return handle


# Every public call that talks to etcd.
CALLS: dict[str, Callable[[EtcdPatterns], object]] = {
    "get_values": lambda p: p.get_values("k"),
    "transform": lambda p: p.transform("k", lambda v: v, default=""),
    "try_transform": lambda p: p.try_transform("k", lambda v: v, default=""),
    "lock": lambda p: p.lock("L", lambda: None, timeout=0.5),
    "try_lock": lambda p: p.try_lock("L", lambda: None),
    "locked": lambda p: _enter(p.locked("L", timeout=0.5)),
    "try_locked": lambda p: _enter(p.try_locked("L")),
    "enqueue": lambda p: p.enqueue("q", "job"),
    "enqueue_many": lambda p: p.enqueue_many("q", ["a", "b"]),
    "dequeue": lambda p: p.dequeue("q", timeout=0.5),
    "dequeue_many": lambda p: p.dequeue_many("q", 2, timeout=0.5),
    "claim": lambda p: _enter(p.claim("q", timeout=0.5)),
    "requeue": lambda p: p.requeue("q.dead", "q"),
    "member": lambda p: _enter(p.member("G", "m1")),
    "members": lambda p: p.members("G"),
    "watch_members": lambda p: next(p.watch_members("G", timeout=0.5)),
    "watch_values": lambda p: next(p.watch_values("k", timeout=0.5)),
    "partitioner": lambda p: _enter(p.partitioner("P", "m1", ["a", "b"])),
    "queue_stats": lambda p: p.queue_stats("q"),
    "peek": lambda p: p.peek("q"),
    "elected": lambda p: _enter(p.elected("E", "v", timeout=0.5)),
    "leader": lambda p: p.leader("E"),
    "observe": lambda p: next(p.observe("E", timeout=0.5)),
    "semaphore": lambda p: _enter(p.semaphore("S", 2, timeout=0.5)),
    "contenders": lambda p: p.contenders("L"),
    "read_locked": lambda p: _enter(p.read_locked("RW", timeout=0.5)),
    "write_locked": lambda p: _enter(p.write_locked("RW", timeout=0.5)),
    "barrier": lambda p: p.barrier("B").wait(timeout=0.5),  # making it sends nothing
    "double_barrier": lambda p: _enter(p.double_barrier("DB", 1, timeout=0.5)),
}


def test_every_public_call_is_covered() -> None:
    public = {
        name
        for name, member in vars(EtcdPatterns).items()
        if callable(member) and not name.startswith("_") and name not in ("connect", "close")
    }
    assert public == set(CALLS)


@pytest.mark.parametrize("method", CALLS)
def test_every_call_after_close_raises_closed_error(
    etcd: EtcdCluster | ExternalEtcd, namespace: str, raw: Raw, method: str
) -> None:
    patterns = EtcdPatterns.connect(etcd.endpoints, namespace=namespace)
    patterns.transform("k", lambda v: "v", default="")
    patterns.close()
    before = raw.snapshot()
    with pytest.raises(ClosedError):
        CALLS[method](patterns)
    assert raw.snapshot() == before  # nothing written


@pytest.mark.parametrize("method", CALLS)
def test_unreachable_etcd_fails_within_the_timeout(method: str) -> None:
    (port,) = free_ports(1)
    endpoint = f"127.0.0.1:{port}"
    with EtcdPatterns.connect(endpoint, timeout=1.0) as patterns:
        started = time.monotonic()
        # Nothing could be sent, so nothing is in doubt: never an unknown outcome.
        with pytest.raises(EtcdUnavailableError, match=endpoint):
            CALLS[method](patterns)
        # The deadline, plus one late wake-up for the attempt that ran into
        # it and one for the retry that found it expired.
        assert time.monotonic() - started < 1.0 + 2 * SCHEDULING_GRACE


@pytest.mark.timeout(60)
def test_a_hung_etcd_fails_within_the_timeout_then_recovers(namespace: str) -> None:
    with (
        EtcdCluster() as cluster,
        EtcdPatterns.connect(cluster.endpoints, namespace=namespace, timeout=1.0) as patterns,
    ):
        patterns.transform("k", lambda v: "1", default="")
        cluster.nodes[0].pause()
        try:
            started = time.monotonic()
            with pytest.raises(EtcdUnavailableError):
                patterns.get_values("k")
            assert time.monotonic() - started < 1.0 + 2 * SCHEDULING_GRACE  # as above
        finally:
            cluster.nodes[0].resume()
        assert patterns.get_values("k") == ["1"]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_same_instance_works_after_etcd_restarts(namespace: str) -> None:
    with (
        EtcdCluster() as cluster,
        EtcdPatterns.connect(cluster.endpoints, namespace=namespace, timeout=2.0) as patterns,
    ):
        patterns.transform("k", lambda v: str(int(v) + 1), default="0")
        cluster.nodes[0].kill()
        with pytest.raises(EtcdUnavailableError):
            patterns.get_values("k")
        cluster.nodes[0].start()
        assert patterns.transform("k", lambda v: str(int(v) + 1)) == "2"
