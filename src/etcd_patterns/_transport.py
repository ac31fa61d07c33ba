"""Sending requests to etcd: deadlines, endpoint failover, error translation.

Every request the library makes goes through `Transport`, which calls the
etcd3 client's gRPC channels directly with ``etcdrpc`` messages. That gives
each request its own deadline (the client's own methods have none by
default), lets a transaction carry sorted and limited ranges, and keeps
python3-etcd3's endpoint bookkeeping (which blacklists a failed endpoint for
five minutes) and its watch thread out of the way.

Guarantees:

* No request waits longer than the instance ``timeout``; then it raises
  `EtcdUnavailableError` naming the endpoints.
* Reads are retried while etcd is unavailable. Writes are retried only when
  the error proves they were not applied; otherwise `OutcomeUnknownError`
  tells the caller to resolve the outcome.
* With several endpoints, a connection failure moves the next attempt to the
  next endpoint.
* An instance belongs to the process that made it. In a forked child, every
  request raises `ForkedProcessError` before anything is sent: the child's
  copies of the gRPC channels are not fork-safe, and the leases they would
  use are the parent's. `close` in a child touches nothing of the parent's.
* Given the credentials, an expired auth token is renewed and the request
  sent again (etcd refuses a request with a stale token before applying it).
  python3-etcd3 authenticates once and fails from then on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

import grpc
from etcd3 import etcdrpc

from ._errors import (
    ClosedError,
    EtcdUnavailableError,
    LeaseNotFoundError,
    OutcomeUnknownError,
    ValueTooLargeError,
    connection_failed,
    forked,
    translate,
)
from ._retry import Deadline, is_transient, retry_transient

T = TypeVar("T")

log = logging.getLogger("etcd_patterns")

# The longest a cleanup may take on the caller's thread: closing, revoking a
# lease, a waiter that gave up withdrawing its key. Short, so that Ctrl-C is
# never held up by it; if etcd is away, a lease expires on its own after its
# TTL, and a withdrawn key is deleted by the keepalive thread.
CLEANUP_TIMEOUT = 2.0

# Room for the envelope etcd wraps around a request before checking its
# size against --max-request-bytes.
_REQUEST_OVERHEAD = 512

DEFAULT_MAX_REQUEST_BYTES = 1_572_864  # etcd's default --max-request-bytes (1.5 MiB)

_INVALID_TOKEN = "etcdserver: invalid auth token"  # noqa: S105 -- an error text, not a secret


class Transport:
    """Sends requests over an etcd3 client's channels.

    Args:
        client: A python3-etcd3 client (`etcd3.MultiEndpointEtcd3Client` or
            `etcd3.Etcd3Client`). Its channels, credentials and auth token
            are used; its own retry and failover logic is not.
        timeout: The longest any one request may take, retries included.
        owns_client: Whether `close` also closes ``client``.
        max_request_bytes: The server's ``--max-request-bytes``; larger
            writes fail with `ValueTooLargeError` before they are sent.
        credentials: User and password, to renew an expired auth token.
    """

    def __init__(
        self,
        client: Any,
        *,
        timeout: float,
        owns_client: bool,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.timeout = timeout
        self.max_request_bytes = max_request_bytes
        self._client = client
        self._owns_client = owns_client
        self._credentials = credentials
        self._channels: list[grpc.Channel] = [ep.channel for ep in client.endpoints.values()]
        self.endpoints: tuple[str, ...] = tuple(client.endpoints)
        current = client.endpoint_in_use
        self._index = self.endpoints.index(current.netloc) if current is not None else 0
        self._stubs: dict[tuple[int, type[Any]], Any] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()

    @property
    def closed(self) -> bool:
        """Whether `close` was called."""
        return self._closed

    def close(self) -> None:
        """Stop sending requests; close the client if this transport owns it."""
        if self.forked:
            # The channels are the parent's; so may be the lock, if another
            # thread held it at the fork.
            self._closed = True
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stubs.clear()
        if self._owns_client:
            # gRPC's close waits for every stream on the channel to finish.
            # A stream whose call was cut short by Ctrl-C inside gRPC can
            # keep it waiting for ever, so the close gets its own thread and
            # a bounded wait; a channel left closing is never torn down
            # under it at interpreter exit either, which would hang there.
            closer = threading.Thread(
                target=self._client.close, name="etcd-patterns-close", daemon=True
            )
            closer.start()
            closer.join(CLEANUP_TIMEOUT)
            if closer.is_alive():
                log.debug("the etcd3 client did not close in %ss; left closing", CLEANUP_TIMEOUT)

    @property
    def forked(self) -> bool:
        """Whether this is a forked child of the process that made the transport."""
        return os.getpid() != self._pid

    # -- requests -----------------------------------------------------------

    def range(self, request: Any, *, deadline: Deadline | None = None) -> Any:
        """Send a `RangeRequest`; retried while etcd is unavailable."""
        return self._unary(etcdrpc.KVStub, "Range", request, write=False, deadline=deadline)

    def txn(self, request: Any, *, write: bool = True, deadline: Deadline | None = None) -> Any:
        """Send a `TxnRequest`.

        Args:
            request: The transaction.
            write: False only if sending the request twice is harmless (it
                changes nothing, or its second application is a no-op).
                Otherwise an interrupted request raises `OutcomeUnknownError`.
            deadline: An earlier deadline than the instance timeout.

        Raises:
            ValueTooLargeError: The request exceeds ``max_request_bytes``.
        """
        size = request.ByteSize()
        if size + _REQUEST_OVERHEAD > self.max_request_bytes:
            raise ValueTooLargeError(
                f"request of {size} bytes exceeds etcd's limit of {self.max_request_bytes} bytes "
                f"(--max-request-bytes, less {_REQUEST_OVERHEAD} bytes of envelope)"
            )
        return self._unary(etcdrpc.KVStub, "Txn", request, write=write, deadline=deadline)

    def lease_grant(self, ttl: int, *, deadline: Deadline | None = None) -> Any:
        """Grant a lease. Retrying a lost grant at worst leaves a lease that expires."""
        request = etcdrpc.LeaseGrantRequest(TTL=ttl)
        return self._unary(etcdrpc.LeaseStub, "LeaseGrant", request, write=False, deadline=deadline)

    def lease_revoke(self, lease_id: int, *, deadline: Deadline | None = None) -> None:
        """Revoke a lease, deleting its keys. A lease already gone is not an error."""
        request = etcdrpc.LeaseRevokeRequest(ID=lease_id)
        with contextlib.suppress(LeaseNotFoundError):
            self._unary(etcdrpc.LeaseStub, "LeaseRevoke", request, write=False, deadline=deadline)

    def lease_keepalive(self, lease_id: int, *, deadline: Deadline | None = None) -> int:
        """Refresh a lease once.

        Returns:
            The lease's new TTL in seconds; 0 or less if it no longer exists.
        """
        request = etcdrpc.LeaseKeepAliveRequest(ID=lease_id)

        def refresh(stub: Any, timeout: float) -> int:
            call = stub.LeaseKeepAlive(iter([request]), timeout=timeout, **self._call_options())
            try:
                response = next(call, None)
            finally:
                call.cancel()
            if response is None:
                raise EtcdUnavailableError("etcd closed the keepalive stream without answering")
            ttl: int = response.TTL
            return ttl

        return self._retry(etcdrpc.LeaseStub, refresh, write=False, deadline=deadline)

    def lease_time_to_live(self, lease_id: int, *, deadline: Deadline | None = None) -> int:
        """The remaining TTL of a lease in seconds; -1 if it does not exist."""
        request = etcdrpc.LeaseTimeToLiveRequest(ID=lease_id)
        response = self._unary(
            etcdrpc.LeaseStub, "LeaseTimeToLive", request, write=False, deadline=deadline
        )
        ttl: int = response.TTL
        return ttl

    def lease_keys(self, lease_id: int, *, deadline: Deadline | None = None) -> list[bytes] | None:
        """The keys a lease carries; None if the lease does not exist."""
        request = etcdrpc.LeaseTimeToLiveRequest(ID=lease_id, keys=True)
        response = self._unary(
            etcdrpc.LeaseStub, "LeaseTimeToLive", request, write=False, deadline=deadline
        )
        if response.TTL <= 0:
            return None
        return list(response.keys)

    def watch(self, creates: Sequence[Any], *, timeout: float) -> Generator[Any, None, None]:
        """Stream the responses of one watch stream, for at most ``timeout``.

        Opens one stream on the current endpoint, with one watch per
        `WatchCreateRequest` in ``creates``, and yields etcd's
        `WatchResponse` messages as they come. The stream is cancelled when
        the caller stops iterating (close the generator to stop early).

        The stream ends quietly when ``timeout`` passes, when the connection
        fails (the next request then goes to the next endpoint) or when the
        auth token had expired: a waiter then reads the state it waits on
        again, which renews the token, and raises if etcd cannot be reached.

        Raises:
            ClosedError: The instance, or the etcd3 client under it, was closed.
            PermissionDeniedError, EtcdError: etcd refused the stream.
        """
        index, stub = self._stub(etcdrpc.WatchStub)
        try:
            # The requests are all sent at once and the stream half-closed,
            # which etcd ignores, so gRPC needs no thread to feed it.
            call = stub.Watch(
                iter([etcdrpc.WatchRequest(create_request=create) for create in creates]),
                timeout=timeout,
                **self._call_options(),
            )
            try:
                yield from call
            finally:
                call.cancel()
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                return
            if self._token_expired(exc):
                return  # the read that follows renews it, within its own deadline
            if connection_failed(exc):
                self._rotate(index)
            error = translate(exc, endpoints=self.endpoints, write=False)
            if error is None or isinstance(error, EtcdUnavailableError):
                return
            raise error from exc
        except ValueError as exc:
            if self._client_channels_closed(exc):
                raise ClosedError("the etcd3 client was closed") from exc
            raise

    # -- machinery ----------------------------------------------------------

    def _unary(
        self,
        stub_class: type[Any],
        method: str,
        request: Any,
        *,
        write: bool,
        deadline: Deadline | None,
    ) -> Any:
        def send(stub: Any, timeout: float) -> Any:
            return getattr(stub, method)(request, timeout=timeout, **self._call_options())

        return self._retry(stub_class, send, write=write, deadline=deadline)

    def _retry(
        self,
        stub_class: type[Any],
        send: Callable[[Any, float], T],
        *,
        write: bool,
        deadline: Deadline | None,
    ) -> T:
        limit = (deadline or Deadline(None)).within(self.timeout)
        # Most requests succeed at once: the first try goes without the
        # retry machinery, which takes over, first failure included, only
        # if it failed in a way worth another try.
        try:
            return self._attempt(stub_class, send, limit, write)
        except (EtcdUnavailableError, OutcomeUnknownError) as exc:
            if not is_transient(exc, write=write):
                raise
            failed: list[BaseException] = [exc]

        def attempt() -> T:
            if failed:
                raise failed.pop()
            return self._attempt(stub_class, send, limit, write)

        # A policy of its own: a shared one would be muddled by a call made
        # inside it on the same thread (from a signal handler, say).
        result: T = retry_transient(limit, write=write)(attempt)
        return result

    def _attempt(
        self,
        stub_class: type[Any],
        send: Callable[[Any, float], T],
        limit: Deadline,
        write: bool,
    ) -> T:
        index, stub = self._stub(stub_class)
        remaining = limit.remaining()
        assert remaining is not None  # limit is always finite
        # Leave time for at least two more tries, so that a hung endpoint
        # does not use up the whole deadline before failover.
        timeout = min(remaining, max(self.timeout / 3, 0.5))
        try:
            return send(stub, timeout)
        except grpc.RpcError as exc:
            if self._token_expired(exc):
                # etcd checks the token before anything else: nothing applied.
                self._renew_token(min(limit.remaining() or 0.0, timeout))
                raise EtcdUnavailableError("the auth token had expired; renewed it") from exc
            log.debug(
                "%s on %s failed: %s %s",
                stub_class.__name__,
                self.endpoints[index],
                exc.code(),
                exc.details(),
            )
            if connection_failed(exc):
                self._rotate(index)
            error = translate(exc, endpoints=self.endpoints, write=write)
            if error is None:  # pragma: no cover - translate handles every RpcError
                raise
            raise error from exc
        except ValueError as exc:
            # grpc raises ValueError when the channel was closed under us.
            if self._client_channels_closed(exc):
                raise ClosedError("the etcd3 client was closed") from exc
            raise

    def _token_expired(self, exc: grpc.RpcError) -> bool:
        """Whether ``exc`` says that the auth token this instance sends has expired."""
        return (
            self._credentials is not None
            and exc.code() == grpc.StatusCode.UNAUTHENTICATED
            and (exc.details() or "") == _INVALID_TOKEN
        )

    def _renew_token(self, timeout: float) -> None:
        """Get a new auth token within ``timeout``.

        Raises:
            EtcdUnavailableError: etcd did not answer in time, or there was
                no time left to ask.
            PermissionDeniedError: etcd refused the credentials.
        """
        if timeout <= 0:
            raise EtcdUnavailableError(
                "the auth token had expired, and no time was left to renew it; nothing was applied"
            )
        assert self._credentials is not None  # an expired token means credentials
        user, password = self._credentials
        index, stub = self._stub(etcdrpc.AuthStub)
        try:
            response = stub.Authenticate(
                etcdrpc.AuthenticateRequest(name=user, password=password), timeout=timeout
            )
        except grpc.RpcError as exc:
            log.debug("renewing the auth token failed: %s", exc.code())
            if connection_failed(exc):
                self._rotate(index)
            error = translate(exc, endpoints=self.endpoints, write=False)
            if error is None or isinstance(error, EtcdUnavailableError):
                raise EtcdUnavailableError(
                    f"the auth token had expired, and renewing it failed: {exc.details()}; "
                    "nothing was applied"
                ) from exc
            raise error from exc
        self._client.metadata = (("token", response.token),)
        log.debug("renewed the auth token of user %r", user)

    def _call_options(self) -> dict[str, Any]:
        # The auth token travels as metadata. The client's call credentials
        # carry the same token, but gRPC refuses them on plain-text channels.
        return {"metadata": self._client.metadata}

    def _stub(self, stub_class: type[Any]) -> tuple[int, Any]:
        if self.forked:
            raise forked(self._pid)
        with self._lock:
            if self._closed:
                raise ClosedError("this EtcdPatterns instance is closed")
            index = self._index
            stub = self._stubs.get((index, stub_class))
            if stub is None:
                stub = self._stubs[(index, stub_class)] = stub_class(self._channels[index])
            return index, stub

    def _rotate(self, failed: int) -> None:
        with self._lock:
            if self._index != failed or len(self._channels) == 1:
                return
            self._index = (failed + 1) % len(self._channels)
        log.info(
            "etcd endpoint %s failed; moving to %s",
            self.endpoints[failed],
            self.endpoints[self._index],
        )

    @staticmethod
    def _client_channels_closed(exc: ValueError) -> bool:
        # "Cannot invoke RPC on closed channel!" or, on a stream,
        # "Cannot invoke RPC: Channel closed!", depending on the call.
        text = str(exc).lower()
        return "closed channel" in text or "channel closed" in text
