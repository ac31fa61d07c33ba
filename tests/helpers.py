"""Test helpers: direct etcd access, and faults injected into a real client."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import etcd3
import grpc
from etcd3 import etcdrpc
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from etcd_patterns.testing import EtcdCluster, ExternalEtcd, read_metrics


class Raw:
    """A plain python3-etcd3 client confined to a namespace, for checking what etcd holds."""

    def __init__(self, endpoints: Sequence[str], namespace: str) -> None:
        host, port = endpoints[0].rsplit(":", 1)
        self.client: Any = etcd3.client(host=host, port=int(port), timeout=10)
        self.namespace = namespace

    def __enter__(self) -> Raw:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.client.close()

    def key(self, key: str) -> bytes:
        return (self.namespace + key).encode()

    def put(self, key: str, value: str | bytes, *, lease: int | None = None) -> int:
        """Write a key; returns the new revision."""
        data = value.encode() if isinstance(value, str) else value
        response = self.client.kvstub.Put(
            etcdrpc.PutRequest(key=self.key(key), value=data, lease=lease or 0), 10
        )
        revision: int = response.header.revision
        return revision

    def get(self, key: str) -> Any:
        """The KeyValue message of a key, or None."""
        response = self.client.kvstub.Range(etcdrpc.RangeRequest(key=self.key(key)), 10)
        return response.kvs[0] if response.kvs else None

    def snapshot(self) -> dict[bytes, tuple[bytes, int]]:
        """Every key in the namespace: its value and mod revision."""
        return {
            meta.key: (value, meta.mod_revision)
            for value, meta in self.client.get_prefix(self.namespace)
        }

    def value(self, key: str) -> bytes | None:
        kv = self.get(key)
        return None if kv is None else bytes(kv.value)

    def revision(self) -> int:
        """etcd's current revision: it moves on every write anywhere."""
        response = self.client.kvstub.Range(etcdrpc.RangeRequest(key=b"\0", count_only=True), 10)
        revision: int = response.header.revision
        return revision

    def count(self, prefix: str = "") -> int:
        """Number of keys under ``namespace + prefix``."""
        start = self.key(prefix)
        end = etcd3.utils.prefix_range_end(start)
        response = self.client.kvstub.Range(
            etcdrpc.RangeRequest(key=start, range_end=end, count_only=True), 10
        )
        count: int = response.count
        return count

    def grant(self, ttl: int) -> int:
        response = self.client.leasestub.LeaseGrant(etcdrpc.LeaseGrantRequest(TTL=ttl), 10)
        lease_id: int = response.ID
        return lease_id

    def revoke(self, lease_id: int) -> None:
        self.client.leasestub.LeaseRevoke(etcdrpc.LeaseRevokeRequest(ID=lease_id), 10)


class LostResponse(grpc.RpcError):
    """What a client sees when a connection drops after sending a request."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "Socket closed (injected)"


class FaultInjector(grpc.UnaryUnaryClientInterceptor):
    """Intercepts unary calls on a real channel to lose requests or responses.

    ``plan`` is called with the method name and request of every call, and
    returns one of:

    * ``"pass"``: send normally;
    * ``"lose-response"``: send it, let etcd apply it, call
      `on_lost_response` if set, then raise as if the connection dropped
      before the answer came;
    * ``"hold"``: do not send it yet, and raise as if the connection dropped;
      the request is kept in `held` so that the test can deliver it later.

    ``error`` makes what is raised in place of an answer: a dropped
    connection by default, or ``KeyboardInterrupt`` for a Ctrl-C that
    arrives while the request is in flight.
    """

    def __init__(self, plan: Callable[[str, Any], str]) -> None:
        self.plan = plan
        self.on_lost_response: Callable[[Any], None] | None = None
        self.error: Callable[[], BaseException] = LostResponse
        self.held: list[tuple[Callable[..., Any], Any, Any]] = []
        self.lock = threading.Lock()

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        action = self.plan(client_call_details.method, request)
        if action == "hold":
            with self.lock:
                self.held.append((continuation, client_call_details, request))
            raise self.error()
        outcome = continuation(client_call_details, request)
        if action == "lose-response":
            outcome.result()  # wait until etcd has answered, then drop the answer
            if self.on_lost_response is not None:
                self.on_lost_response(request)
            raise self.error()
        return outcome

    def deliver_held(self) -> list[Any]:
        """Send every held request now; their responses, in order."""
        with self.lock:
            held, self.held = self.held, []
        # A late copy arrives with time to be served: the deadline it was
        # sent with has long passed, and etcd would refuse it unread.
        return [
            continuation(details._replace(timeout=10.0), request).result()
            for continuation, details, request in held
        ]


def client_with_faults(endpoints: Sequence[str], injector: FaultInjector) -> Any:
    """A python3-etcd3 client whose channels pass through ``injector``."""
    client = etcd3.MultiEndpointEtcd3Client(
        endpoints=[
            etcd3.Endpoint(host, int(port), secure=False)
            for host, port in (e.rsplit(":", 1) for e in endpoints)
        ],
        timeout=10,
    )
    for endpoint in client.endpoints.values():
        endpoint.channel = grpc.intercept_channel(endpoint.channel, injector)
    return client


# etcd revokes expired leases in a sweep every 500 ms (its lessor's
# revokeExpiredLeases loop).
ETCD_EXPIRY_SWEEP = 0.5
# What a loaded 2-core machine may add to a wake-up: a watch event delivered,
# a thread scheduled, one read.
SCHEDULING_GRACE = 1.0


def freed_within(ttl: float) -> float:
    """The longest from a holder's SIGKILL until a waiter has what it held.

    At the kill, the holder's lease has at most ``ttl`` left (its last
    refresh reset it to ``ttl``); etcd deletes its keys at the next sweep
    after that; the waiter then wakes on its watch.
    """
    return ttl + ETCD_EXPIRY_SWEEP + SCHEDULING_GRACE


def watchers(etcd: EtcdCluster | ExternalEtcd) -> int:
    """How many watchers etcd serves right now, over every member."""
    return sum(
        int(value)
        for url in etcd.metrics_urls
        for name, _, value in read_metrics(url)
        if name == "etcd_debugging_mvcc_watcher_total"
    )


def wait_until(condition: Callable[[], bool], *, timeout: float = 20.0) -> None:
    """Re-check ``condition`` every 10 ms until it holds; fail after ``timeout``.

    For states that only etcd can report (a contender registered, say), where
    there is no event to wait on.
    """
    poll = Retrying(
        retry=retry_if_result(lambda ok: not ok),
        stop=stop_after_delay(timeout),
        wait=wait_fixed(0.01),
        retry_error_callback=lambda _state: False,
    )
    if not poll(condition):
        raise AssertionError(f"condition not met within {timeout}s")


def run_together(work: Sequence[Callable[[], object]], *, timeout: float = 100.0) -> None:
    """Run each callable in its own thread, all released at once by a barrier.

    Joins them all, then fails if any raised or any is still running.
    """
    start = threading.Barrier(len(work))
    errors: list[BaseException] = []

    def run(task: Callable[[], object]) -> None:
        try:
            start.wait(timeout=30)
            task()
        except BaseException as exc:  # reported by the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(task,)) for task in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert not any(thread.is_alive() for thread in threads), "a worker is still running"
    assert errors == [], errors


def run_processes(
    target: Callable[..., object], args: Sequence[object], count: int, *, timeout: float = 150.0
) -> None:
    """Run ``target(*args, start)`` in ``count`` fresh processes, released together.

    ``start`` is a barrier the target must wait on before its work. Processes
    are spawned, not forked: forking a process that runs gRPC threads is
    unsafe. Fails unless every process exits with status 0.
    """
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(count)
    processes = [context.Process(target=target, args=(*args, start)) for _ in range(count)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=timeout)
    assert [process.exitcode for process in processes] == [0] * count


@contextmanager
def holder_to_kill(target: Callable[..., object], *args: object) -> Iterator[Callable[[], float]]:
    """Run ``target(*args, ready)`` in a spawned process until it sets ``ready``.

    Yields a function that SIGKILLs the process and returns when it did
    (`time.monotonic`). Whatever happens, the process is killed and joined
    on leaving the block.
    """
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=target, args=(*args, ready))
    process.start()

    def kill() -> float:
        os.kill(process.pid or 0, signal.SIGKILL)
        return time.monotonic()

    try:
        assert ready.wait(timeout=30), "the holder never got ready"
        yield kill
    finally:
        process.kill()
        process.join()


def resolves(request: Any) -> bool:
    """Whether a Txn is the exactly-once commit's resolution: it nests one in its failure."""
    return any(op.HasField("request_txn") for op in request.failure)
