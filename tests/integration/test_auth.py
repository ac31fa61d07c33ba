"""User and password authentication, with a role confined to a key prefix."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
from etcd3 import etcdrpc

from etcd_patterns import EtcdPatterns, EtcdUnavailableError, PermissionDeniedError
from etcd_patterns._retry import Deadline
from etcd_patterns._wait import Watch, wait
from etcd_patterns.testing import EtcdCluster, find_etcd_binary, free_ports
from tests.helpers import SCHEDULING_GRACE


@pytest.fixture(scope="module")
def secured() -> Iterator[EtcdCluster]:
    # Tokens expire after one idle second, so that tests can outlive them.
    with EtcdCluster(extra_args=["--auth-token-ttl=1"]) as cluster:
        etcdctl = [find_etcd_binary("etcdctl"), f"--endpoints={cluster.endpoints[0]}"]
        for command in (
            ["user", "add", "root:rootpw"],
            ["user", "add", "app:apppw"],
            ["role", "add", "app"],
            ["role", "grant-permission", "app", "--prefix=true", "readwrite", "/app/"],
            ["user", "grant-role", "app", "app"],
            ["auth", "enable"],
        ):
            subprocess.run([*etcdctl, *command], check=True, capture_output=True, timeout=30)
        yield cluster


def test_a_user_confined_to_a_prefix_works_inside_it(secured: EtcdCluster) -> None:
    with EtcdPatterns.connect(
        secured.endpoints, user="app", password="apppw", namespace="/app/"
    ) as etcd:
        assert etcd.transform("k", lambda v: v + "x", default="") == "x"
        assert etcd.get_values("k") == ["x"]


def test_outside_its_prefix_it_is_denied(secured: EtcdCluster) -> None:
    with EtcdPatterns.connect(
        secured.endpoints, user="app", password="apppw", namespace="/other/"
    ) as etcd:
        with pytest.raises(PermissionDeniedError, match="permission denied"):
            etcd.get_values("k")
        with pytest.raises(PermissionDeniedError):
            etcd.transform("k", lambda v: v, default="")


def test_a_wrong_password_is_refused_at_connect(secured: EtcdCluster) -> None:
    with pytest.raises(PermissionDeniedError, match="authentication failed") as info:
        EtcdPatterns.connect(secured.endpoints, user="app", password="s3cret-guess")
    assert "s3cret-guess" not in str(info.value)
    assert "s3cret-guess" not in repr(info.value.__cause__)


def test_every_pattern_works_inside_the_prefix(secured: EtcdCluster) -> None:
    with EtcdPatterns.connect(
        secured.endpoints, user="app", password="apppw", namespace="/app/"
    ) as etcd:
        assert etcd.lock("L", lambda: etcd.try_transform("n", lambda v: "1", default="0")) == (
            True,
            "1",
        )
        assert etcd.try_lock("L", lambda: "held").value == "held"
        etcd.enqueue_many("q", ["a", "b", "c"])
        assert etcd.dequeue("q") == "a"
        assert etcd.dequeue_many("q", 1) == ["b"]
        with etcd.claim("q") as item:
            assert item.value == "c"
        assert etcd.get_values("q") == []


@pytest.mark.slow
def test_an_expired_token_is_renewed(secured: EtcdCluster) -> None:
    with EtcdPatterns.connect(
        secured.endpoints, user="app", password="apppw", namespace="/app/"
    ) as etcd:
        etcd.transform("n", lambda v: "1", default="")
        threading.Event().wait(3)  # idle for longer than the token lives
        assert etcd.transform("n", lambda v: v + "1") == "11"


def _recording_stubs(transport: Any, on_call: Callable[[str, float], None]) -> None:
    """Have every Range and Authenticate call report its name and timeout first."""
    stub_of = transport._stub

    def recorded(stub_class: type[Any]) -> tuple[int, Any]:
        index, stub = stub_of(stub_class)

        class Recording:
            def __getattr__(self, method: str) -> Any:
                call = getattr(stub, method)

                def reported(request: Any, *, timeout: float, **options: Any) -> Any:
                    on_call(method, timeout)
                    return call(request, timeout=timeout, **options)

                return reported

        return index, Recording()

    transport._stub = recorded


@pytest.mark.timeout(30)
def test_renewing_the_token_keeps_to_the_callers_deadline(secured: EtcdCluster) -> None:
    with EtcdPatterns.connect(
        secured.endpoints, user="app", password="apppw", namespace="/app/", timeout=10
    ) as etcd:
        transport = etcd._transport
        calls: list[tuple[str, float]] = []
        _recording_stubs(transport, lambda method, timeout: calls.append((method, timeout)))
        transport._client.metadata = (("token", "stale"),)  # as if it had expired
        transport.range(etcdrpc.RangeRequest(key=b"/app/k"), deadline=Deadline(2))
    assert transport._client.metadata != (("token", "stale"),)  # renewed
    assert [method for method, _ in calls] == ["Range", "Authenticate", "Range"]
    assert 0 < calls[1][1] <= 2  # the caller's 2 s, not the instance's 10 s


@pytest.mark.timeout(30)
def test_a_token_with_no_time_left_to_renew_is_unavailable_not_denied(
    secured: EtcdCluster,
) -> None:
    with EtcdPatterns.connect(
        secured.endpoints, user="app", password="apppw", namespace="/app/"
    ) as etcd:
        transport = etcd._transport
        now = [time.monotonic()]
        methods: list[str] = []

        def spend_it_all(method: str, timeout: float) -> None:
            methods.append(method)
            now[0] += 60  # the request takes the whole deadline

        _recording_stubs(transport, spend_it_all)
        transport._client.metadata = (("token", "stale"),)  # as if it had expired
        deadline = Deadline(5, clock=lambda: now[0])
        # Nothing was applied (etcd checks the token first), and the
        # credentials are fine: neither denied nor in doubt.
        with pytest.raises(EtcdUnavailableError, match="no time was left to renew it"):
            transport.range(etcdrpc.RangeRequest(key=b"/app/k"), deadline=deadline)
    assert methods == ["Range"]  # never asked for a token it could not wait for


@pytest.mark.timeout(30)
def test_a_wait_whose_token_expired_renews_it_and_watches_again(secured: EtcdCluster) -> None:
    # The token goes stale just before the consumer's watch is made: etcd
    # refuses the watch, the read that follows renews the token, and the
    # next watch sees the item arrive.
    with (
        EtcdPatterns.connect(
            secured.endpoints, user="app", password="apppw", namespace="/app/"
        ) as consumer,
        EtcdPatterns.connect(
            secured.endpoints, user="app", password="apppw", namespace="/app/"
        ) as producer,
    ):
        transport = consumer._transport
        client = transport._client
        streams: list[object] = []
        watching = threading.Event()
        original = transport.watch

        def watch(*args: Any, **kwargs: Any) -> Any:
            streams.append(args)
            if len(streams) == 1:
                client.metadata = (("token", "stale"),)  # as if it had expired
            for response in original(*args, **kwargs):
                if response.created and not response.canceled:
                    watching.set()
                yield response

        transport.watch = watch  # type: ignore[method-assign]
        received: list[str] = []
        waiter = threading.Thread(target=lambda: received.append(consumer.dequeue("w", timeout=20)))
        waiter.start()
        assert watching.wait(timeout=20)  # blocked on its second watch
        producer.enqueue("w", "late item")
        waiter.join(timeout=20)
        assert received == ["late item"]
        assert len(streams) == 2  # refused once, then watched with a new token
        assert client.metadata != (("token", "stale"),)


class _Seen(NamedTuple):
    revision: int


@pytest.mark.timeout(30)
def test_a_refused_watch_raises_instead_of_spinning(secured: EtcdCluster) -> None:
    # etcd refuses a watch by creating and cancelling it at once. A waiter
    # allowed to read what it waits on, but not to watch it, must say so
    # rather than read and re-watch until its timeout.
    with EtcdPatterns.connect(
        secured.endpoints, user="app", password="apppw", namespace="/app/"
    ) as etcd:
        transport = etcd._transport
        watches: list[object] = []
        original = transport.watch

        def counting(*args: Any, **kwargs: Any) -> Any:
            watches.append(args)
            return original(*args, **kwargs)

        transport.watch = counting  # type: ignore[method-assign]

        def read() -> _Seen:
            response = transport.range(etcdrpc.RangeRequest(key=b"/app/allowed"))
            return _Seen(response.header.revision)

        forbidden = Watch([etcdrpc.WatchCreateRequest(key=b"/other/k")], lambda _event: True)
        with pytest.raises(PermissionDeniedError, match="refused to watch"):
            wait(
                transport,
                read(),
                read=read,
                watch=lambda _state: forbidden,
                deadline=Deadline(20),
                timeout_error=lambda: AssertionError("spun until the timeout"),
            )
        assert len(watches) == 2  # refused, read (allowed), refused again


@pytest.mark.timeout(30)
def test_connecting_with_credentials_to_an_unreachable_etcd_is_unavailable() -> None:
    (port,) = free_ports(1)
    endpoint = f"127.0.0.1:{port}"
    timeout = 1.0
    started = time.monotonic()
    with pytest.raises(EtcdUnavailableError, match=endpoint):
        EtcdPatterns.connect(endpoint, user="app", password="apppw", timeout=timeout)
    # The deadline, plus one late wake-up for the attempt that ran into it
    # and one for the retry that found it expired.
    assert time.monotonic() - started < timeout + 2 * SCHEDULING_GRACE


def _cli(secured: EtcdCluster, *args: str, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "etcd_patterns"),
            *(f"--endpoints={secured.endpoints[0]}", "--namespace=/app/", "--user=app"),
            *args,
        ],
        env={**os.environ, "ETCD_PASSWORD": password},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_cli_reads_the_password_from_the_environment(secured: EtcdCluster) -> None:
    assert _cli(secured, "transform", "cli", "--set", "x", password="apppw").stdout == "x\n"
    refused = _cli(secured, "get", "cli", password="s3cret-guess")
    assert refused.returncode == 1
    assert "authentication failed" in refused.stderr
    assert "s3cret-guess" not in refused.stderr
