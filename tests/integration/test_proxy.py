"""The fault proxy: each fault happens, and heals."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import etcd3
import grpc
import pytest
from etcd3 import etcdrpc

from etcd_patterns import EtcdPatterns, EtcdUnavailableError, LockLostError, OutcomeUnknownError
from etcd_patterns._connect import _CHANNEL_OPTIONS
from etcd_patterns.testing import EtcdCluster, ExternalEtcd, FaultProxy
from tests.helpers import SCHEDULING_GRACE, Raw

# Dropped answers and cut connections: fault tests, never run on an etcd
# that panics when clients drop connections mid-request.
pytestmark = pytest.mark.chaos


@pytest.fixture
def proxied(etcd: EtcdCluster | ExternalEtcd) -> Iterator[FaultProxy]:
    host, port = etcd.endpoints[0].rsplit(":", 1)
    with FaultProxy((host, int(port)), seed=1) as proxy:
        yield proxy


def _client(endpoint: str) -> etcd3.Etcd3Client:
    host, port = endpoint.rsplit(":", 1)
    return etcd3.client(host=host, port=int(port), timeout=5)


@pytest.mark.timeout(30)
def test_a_blackholed_member_makes_a_request_time_out(proxied: FaultProxy, namespace: str) -> None:
    timeout = 1.0
    with EtcdPatterns.connect(proxied.endpoint, namespace=namespace, timeout=timeout) as etcd:
        etcd.get_values("k")  # connected
        proxied.blackhole()
        started = time.monotonic()
        with pytest.raises(EtcdUnavailableError):
            etcd.get_values("k")
        elapsed = time.monotonic() - started
        assert proxied.stats["bytes held"] > 0
        assert timeout <= elapsed < 2 * timeout
        proxied.heal()
        assert etcd.get_values("k") == []


@pytest.mark.timeout(30)
def test_a_delay_holds_every_answer(proxied: FaultProxy, namespace: str) -> None:
    delay = 0.3
    with EtcdPatterns.connect(proxied.endpoint, namespace=namespace, timeout=5) as etcd:
        etcd.get_values("k")
        proxied.delay(delay)
        started = time.monotonic()
        etcd.get_values("k")
        assert time.monotonic() - started >= 2 * delay  # the request, then the answer
        assert proxied.stats["chunks delayed"] >= 2
        proxied.heal()


@pytest.mark.timeout(30)
def test_a_dropped_answer_leaves_the_write_applied_while_the_client_saw_an_error(
    proxied: FaultProxy, raw: Raw
) -> None:
    client = _client(proxied.endpoint)
    try:
        client.kvstub.Range(etcdrpc.RangeRequest(key=b"warm"), 5)  # connected
        proxied.drop_answers()
        with pytest.raises(grpc.RpcError):
            client.kvstub.Put(etcdrpc.PutRequest(key=raw.key("k"), value=b"applied"), 5)
        assert proxied.stats["answers dropped"] == 1
    finally:
        proxied.heal()
        client.close()
    assert raw.value("k") == b"applied"


@pytest.mark.timeout(30)
def test_the_library_reports_a_write_whose_answers_are_all_dropped(
    proxied: FaultProxy, namespace: str, raw: Raw
) -> None:
    with EtcdPatterns.connect(proxied.endpoint, namespace=namespace, timeout=1) as etcd:
        etcd.enqueue("warm", "up")  # the session and its lease exist
        proxied.drop_answers()
        with pytest.raises(OutcomeUnknownError):
            etcd.enqueue("q", "job")  # one transaction, and no read before it
        assert proxied.stats["answers dropped"] >= 2  # the write's, and its settling's
        proxied.heal()
    # Applied once or not at all, never twice.
    assert raw.count("q/") in (0, 1)


@pytest.mark.timeout(30)
def test_a_reset_cuts_a_waiting_watch_which_is_made_again(
    proxied: FaultProxy, namespace: str, raw: Raw
) -> None:
    with EtcdPatterns.connect(proxied.endpoint, namespace=namespace, timeout=5) as etcd:
        got: list[str] = []
        consumer = threading.Thread(target=lambda: got.append(etcd.dequeue("q", timeout=20)))
        consumer.start()
        deadline = time.monotonic() + 10
        while proxied.stats["connections cut"] == 0 and time.monotonic() < deadline:
            proxied.reset()  # cuts the consumer's watch stream once it is open
        assert proxied.stats["connections cut"] >= 1
        raw.put("q/1", "after the reset")
        consumer.join(timeout=20)
        assert got == ["after the reset"]


@pytest.mark.timeout(60)
def test_a_holder_cut_off_from_etcd_is_in_doubt_until_etcd_says_it_lost(
    proxied: FaultProxy, namespace: str
) -> None:
    ttl, timeout = 3, 1.0
    with EtcdPatterns.connect(proxied.endpoint, namespace=namespace, timeout=timeout) as etcd:
        holding = etcd.locked("L", ttl=ttl)
        held = holding.__enter__()
        assert time.monotonic() < held.confirmed_until
        proxied.blackhole()
        threading.Event().wait(ttl + 1)  # let the lease's TTL run out in etcd
        assert proxied.stats["bytes held"] > 0
        # Only etcd can say the lease is gone, and it cannot be asked: the
        # hold is in doubt, not lost.
        assert not held.lost.is_set()
        assert held.confirmed_until < time.monotonic()
        proxied.heal()
        # The next refresh (retried every half second) hears it from etcd,
        # once the connection is usable again: gRPC's keepalive may have
        # found it dead during the blackhole, and a new one is then made.
        options = dict(_CHANNEL_OPTIONS)
        keepalive = (
            options["grpc.keepalive_time_ms"] + options["grpc.keepalive_timeout_ms"]
        ) / 1000
        assert held.lost.wait(keepalive + 0.5 + timeout + 2)
        with pytest.raises(LockLostError):
            holding.__exit__(None, None, None)


@pytest.mark.timeout(120)
def test_a_member_that_hangs_without_dying_is_failed_over_within_the_timeout(
    namespace: str,
) -> None:
    timeout = 1.0
    with (
        EtcdCluster(size=3, proxied=True, seed=1) as cluster,
        EtcdPatterns.connect(cluster.endpoints, namespace=namespace, timeout=timeout) as etcd,
    ):
        etcd.transform("n", lambda v: "0", default="")
        etcd.enqueue("q", "before")
        calls: dict[str, Callable[[], object]] = {
            "transform": lambda: etcd.transform("n", lambda v: str(int(v) + 1)),
            "get_values": lambda: etcd.get_values("n"),
            "lock": lambda: etcd.lock("L", lambda: "held", timeout=timeout),
            "enqueue": lambda: etcd.enqueue("q", "during"),
            "dequeue": lambda: etcd.dequeue("q", timeout=timeout),
        }
        for name, call in calls.items():
            # Hang the member this client talks to now, whichever it is.
            in_use = etcd._transport._index
            hung = cluster.nodes[in_use].proxy
            assert hung is not None
            hung.blackhole()  # alive, connected, answering nothing
            started = time.monotonic()
            call()  # succeeds on another member
            elapsed = time.monotonic() - started
            hung.heal()
            assert etcd._transport._index != in_use, name  # it failed over
            assert hung.stats["bytes held"] > 0, name  # the fault fired
            # The deadline, plus one late wake-up for the attempt that ran
            # into the hung member and one for the retry elsewhere.
            assert elapsed < timeout + 2 * SCHEDULING_GRACE, name
        assert etcd.get_values("n") == ["1"]
