"""Exceptions, and the one place where gRPC and etcd3 errors are translated.

Every exception the library raises on purpose derives from
`EtcdPatternsError`. Misuse errors also derive from the matching built-in,
and every wait that runs out of time raises a `TimeoutError`::

    EtcdPatternsError
    ├── InvalidArgumentError (ValueError)      bad key, value, ttl or timeout
    │   ├── ValueTooLargeError                 a request would exceed etcd's limit
    │   └── SemaphoreLimitError                a semaphore's limit differs from the recorded one
    ├── InvalidTypeError (TypeError)           wrong type, e.g. a fn that returns int
    ├── ClosedError (RuntimeError)             the instance was closed
    ├── ForkedProcessError (RuntimeError)      the instance was made before a fork
    ├── KeyNotFoundError (KeyError)            the key holds no value
    ├── NotAValueError                         the key is a directory
    ├── ValueDecodeError (ValueError)          stored data is not UTF-8
    ├── ConflictError (TimeoutError)           transform gave up on conflicts
    ├── LockTimeoutError (TimeoutError)        a lock was not acquired in time
    │   └── SemaphoreTimeoutError              no semaphore permit in time
    ├── LockLostError                          a lock's ownership was lost
    ├── LockReentryError (RuntimeError)        a thread re-acquired a lock it holds
    ├── NotALockError (ValueError)             a lock's name is a key holding a value
    ├── ElectionTimeoutError (TimeoutError)    not elected, or no change seen, in time
    ├── LeadershipLostError                    a leader's leadership was lost
    ├── NotAnElectionError (ValueError)        an election's name is a key holding a value
    ├── BarrierTimeoutError (TimeoutError)     a barrier wait ran out of time
    ├── BarrierBrokenError                     a double barrier's round broke
    ├── BarrierFullError                       a double barrier's round is full
    ├── QueueEmptyError (TimeoutError)         no item arrived within the timeout
    ├── ClaimLostError                         a claimed item's claim expired
    ├── MemberExistsError (ValueError)         a group has a member of that id already, or data
    ├── MembershipLostError                    a member's key is gone from its group
    ├── WatchTimeoutError (TimeoutError)       no change within the timeout
    ├── EtcdUnavailableError                   etcd did not answer in time; nothing changed
    ├── OutcomeUnknownError                    a write may or may not have applied
    ├── PermissionDeniedError                  authentication or role check failed
    └── EtcdError                              any other error reported by etcd
        ├── LeaseNotFoundError                 the lease expired or was revoked
        └── QuotaExceededError                 etcd's database is full

`translate` turns a `grpc.RpcError` (or an `etcd3.exceptions` error) into one
of these, always raised ``from`` the original so the cause stays visible.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import grpc
from etcd3 import exceptions as etcd3_exc

__all__ = [
    "BarrierBrokenError",
    "BarrierFullError",
    "BarrierTimeoutError",
    "ClaimLostError",
    "ClosedError",
    "ConflictError",
    "ElectionTimeoutError",
    "EtcdError",
    "EtcdPatternsError",
    "EtcdUnavailableError",
    "ForkedProcessError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "KeyNotFoundError",
    "LeadershipLostError",
    "LeaseNotFoundError",
    "LockLostError",
    "LockReentryError",
    "LockTimeoutError",
    "MemberExistsError",
    "MembershipLostError",
    "NotALockError",
    "NotAValueError",
    "NotAnElectionError",
    "OutcomeUnknownError",
    "PermissionDeniedError",
    "QueueEmptyError",
    "QuotaExceededError",
    "SemaphoreLimitError",
    "SemaphoreTimeoutError",
    "ValueDecodeError",
    "ValueTooLargeError",
    "WatchTimeoutError",
    "forked",
    "translate",
]


class EtcdPatternsError(Exception):
    """Base class of every error raised by etcd-patterns."""


class InvalidArgumentError(EtcdPatternsError, ValueError):
    """An argument has the right type but an unusable value.

    Raised before anything is sent to etcd, so etcd is unchanged.
    """


class ValueTooLargeError(InvalidArgumentError):
    """A request would exceed etcd's request size limit (``--max-request-bytes``)."""


class SemaphoreLimitError(InvalidArgumentError):
    """A contender passed a semaphore ``limit`` other than the one recorded.

    Every contender of a semaphore must pass the same limit; the first one
    records it. Nothing was written.

    Attributes:
        recorded: The limit that the semaphore's contenders use.
    """

    def __init__(self, message: str, *, recorded: int) -> None:
        super().__init__(message)
        self.recorded = recorded


class InvalidTypeError(EtcdPatternsError, TypeError):
    """An argument, or the result of a user callable, has the wrong type.

    Raised before anything is written, so etcd is unchanged.
    """


class ClosedError(EtcdPatternsError, RuntimeError):
    """The `EtcdPatterns` instance was used after `close()`."""


class ForkedProcessError(EtcdPatternsError, RuntimeError):
    """The instance was made in another process, which then forked this one.

    A forked child shares its parent's gRPC connections (which are not
    fork-safe) and its session lease (whose locks and claims are the
    parent's), so it must make an instance of its own.
    """


def forked(parent: int) -> ForkedProcessError:
    """The error for an instance made in process ``parent`` and used in a child."""
    return ForkedProcessError(
        f"this EtcdPatterns instance was made in process {parent}, which forked "
        f"this one ({os.getpid()}); make a new instance in each process after the "
        "fork (see docs/reliability.md, 'Processes and fork')"
    )


class KeyNotFoundError(EtcdPatternsError, KeyError):
    """The key holds no value."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"key {self.key!r} not found"


class NotAValueError(EtcdPatternsError):
    """The key has no value of its own but has children: it is a directory."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"key {self.key!r} is a directory (it has children but no value)"


class ValueDecodeError(EtcdPatternsError, ValueError):
    """A value stored in etcd is not valid UTF-8."""

    def __init__(self, key: str, raw: bytes) -> None:
        super().__init__(key, raw)
        self.key = key
        self.raw = raw

    def __str__(self) -> str:
        return f"value of key {self.key!r} is not UTF-8 ({self.raw[:32]!r}...)"


class ConflictError(EtcdPatternsError, TimeoutError):
    """`transform` lost the race to other writers until its timeout ran out."""


class LockTimeoutError(EtcdPatternsError, TimeoutError):
    """A lock was not acquired within the timeout. The waiter left no key behind."""


class SemaphoreTimeoutError(LockTimeoutError):
    """No permit of a semaphore within the timeout. The waiter left no key behind."""


class LockLostError(EtcdPatternsError):
    """The lock's ownership was lost: its session lease expired or was revoked.

    Raised after a block ran while the lock was lost (with the block's
    result in `result`), and by a write guarded by a lock that is no longer
    held (which wrote nothing).

    Attributes:
        name: The lock's name.
        result: The block's return value, if a block ran to completion.
    """

    def __init__(self, message: str, *, name: str, result: object = None) -> None:
        super().__init__(message)
        self.name = name
        self.result = result


class LockReentryError(EtcdPatternsError, RuntimeError):
    """A thread tried to acquire a lock that it already holds.

    Locks are not re-entrant: sharing silently would hide bugs, and waiting
    would deadlock.
    """


class NotALockError(EtcdPatternsError, ValueError):
    """The lock's name is a key that holds a value.

    A lock lives in the directory ``name/``; a value stored at ``name`` itself
    means the name is already used for data. Nothing was written.
    """


class ElectionTimeoutError(EtcdPatternsError, TimeoutError):
    """A campaign was not elected, or an observer saw no change, within the timeout.

    A campaign that times out leaves no key behind.
    """


class LeadershipLostError(EtcdPatternsError):
    """A leader is leader no more: its session lease expired or was revoked.

    Raised by `Leadership.proclaim` and by writes guarded by the leadership
    (which then wrote nothing), and on leaving the block of
    `EtcdPatterns.elected` if the leadership was lost in it.

    Attributes:
        name: The election's name.
    """

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(message)
        self.name = name


class NotAnElectionError(EtcdPatternsError, ValueError):
    """The election's name is a key that holds a value, or has data under it.

    An election lives in the directory ``name/``, where every key is a
    candidate on its lease; a value at ``name`` itself, or a key without a
    lease under it, means the name is used for data. Nothing was written.
    """


class BarrierTimeoutError(EtcdPatternsError, TimeoutError):
    """A barrier stayed up, or a double barrier's round did not begin or end, in time."""


class BarrierBrokenError(EtcdPatternsError):
    """A double barrier's round broke: a participant died or gave up before it left.

    This participant's key was withdrawn; the next round starts afresh.
    """


class BarrierFullError(EtcdPatternsError):
    """A double barrier's round already has its ``count`` participants.

    This participant's key was withdrawn. A newcomer that arrives while a
    round is under way is not refused: it waits for the next round.
    """


class QueueEmptyError(EtcdPatternsError, TimeoutError):
    """No item became available within the timeout."""


class ClaimLostError(EtcdPatternsError):
    """A claim expired (its session lease was lost) before it was acked.

    The item was not removed: it is available to other consumers again, or
    already processed by one of them.
    """


class MemberExistsError(EtcdPatternsError, ValueError):
    """The group has a member of this id already, or its key holds data; nothing was written."""


class MembershipLostError(EtcdPatternsError):
    """A member's key is gone from its group: its session lease expired or was revoked.

    Raised by `Member.update` and by writes guarded by the member (which
    then wrote nothing), and on leaving the block of `EtcdPatterns.member`
    if the membership was lost in it.
    """


class WatchTimeoutError(EtcdPatternsError, TimeoutError):
    """A watched value, or a group's membership, did not change within the timeout."""


class EtcdUnavailableError(EtcdPatternsError):
    """etcd did not answer within the configured timeout.

    Nothing was changed: the request was never applied, or was a read.
    """


class OutcomeUnknownError(EtcdPatternsError):
    """A write reached etcd but its outcome could not be determined.

    The write may or may not have been applied. Operations that can find out
    (transform, for one) resolve this themselves and only raise it when that
    failed too: etcd stayed away, or the session lease that makes resolution
    possible was lost as well. It is deliberately not an
    `EtcdUnavailableError`, which means that nothing changed: retrying this
    blindly may apply a write twice.

    Attributes:
        taken: For `EtcdPatterns.dequeue_many`: values taken for certain
            before the write whose outcome is unknown. They are the
            caller's now, and no longer in the queue. `bytes` with
            ``decode=False``.
        uncertain: For `EtcdPatterns.dequeue` and `dequeue_many`: the values
            the unsettled write may have taken. Each is either still queued
            (and will be delivered) or was taken and delivered to nobody.
            `bytes` with ``decode=False``.
    """

    def __init__(
        self,
        message: str,
        *,
        taken: Sequence[str | bytes] = (),
        uncertain: Sequence[str | bytes] = (),
    ) -> None:
        super().__init__(message)
        self.taken = list(taken)
        self.uncertain = list(uncertain)


class PermissionDeniedError(EtcdPatternsError):
    """etcd refused the request: bad credentials, or a role lacks permission."""


class EtcdError(EtcdPatternsError):
    """An error reported by etcd that has no more specific class."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class LeaseNotFoundError(EtcdError):
    """The lease expired or was revoked."""


class QuotaExceededError(EtcdError):
    """etcd's database reached its quota (``--quota-backend-bytes``).

    etcd then raises its NOSPACE alarm and refuses every transaction, even a
    read-only one, until space is freed (delete keys, compact, defragment)
    and the alarm is disarmed (``etcdctl alarm disarm``).
    """


# etcd's own error strings (server/etcdserver/api/v3rpc/rpctypes).
_NO_LEADER = "etcdserver: no leader"
_TOO_MANY_REQUESTS = "etcdserver: too many requests"
_NOT_CAPABLE = "etcdserver: not capable"
_REQUEST_TOO_LARGE = "etcdserver: request is too large"
_LEASE_NOT_FOUND = "etcdserver: requested lease not found"
_AUTH_FAILED = "etcdserver: authentication failed"
_NO_SPACE = "etcdserver: mvcc: database space exceeded"

# gRPC's wording when TLS fails: during the handshake, or (TLS 1.3) when the
# server's rejection of the client's certificate arrives just after it.
_TLS_FAILURES = ("andshake failed", "TSI_", "SSL_ERROR")

# gRPC's wording when no connection could be made, so nothing was sent.
_NOT_CONNECTED = (
    "failed to connect to all addresses",
    "connections to all backends failing",
    "Connection refused",
    "DNS resolution failed",
    "no connection available",
    "there is no address available",
)

_AMBIGUOUS_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


def never_sent(code: grpc.StatusCode | None, details: str) -> bool:
    """Whether an error proves that the request was not applied by etcd."""
    if details in (_NO_LEADER, _TOO_MANY_REQUESTS, _NOT_CAPABLE):
        return True
    return code == grpc.StatusCode.UNAVAILABLE and any(s in details for s in _NOT_CONNECTED)


def connection_failed(exc: BaseException) -> bool:
    """Whether the error suggests the current endpoint is unusable.

    The transport then moves to the next endpoint before retrying.
    """
    if isinstance(exc, grpc.RpcError):
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return (exc.details() or "") != _TOO_MANY_REQUESTS
    return False


def translate(
    exc: BaseException, *, endpoints: Sequence[str], write: bool
) -> EtcdPatternsError | None:
    """Translate a gRPC or etcd3 error into the library's exception tree.

    Args:
        exc: The error raised by the gRPC stub or the etcd3 client.
        endpoints: The endpoints in use, named in unavailability errors.
        write: True if the request could change etcd. An interrupted write
            is `OutcomeUnknownError`; an interrupted read is plain
            `EtcdUnavailableError`.

    Returns:
        The exception to raise ``from exc``, or None if ``exc`` is neither a
        gRPC nor an etcd3 error (a bug, which must propagate unchanged).
    """
    where = ",".join(endpoints)
    if isinstance(exc, grpc.RpcError):
        code = exc.code()
        details = exc.details() or ""
        return _translate_status(code, details, where=where, write=write)
    return _translate_etcd3(exc, where=where)


def _translate_status(
    code: grpc.StatusCode | None, details: str, *, where: str, write: bool
) -> EtcdPatternsError:
    name = code.name if code is not None else "UNKNOWN"
    if any(sign in details for sign in _TLS_FAILURES) and never_sent(code, details):
        # A certificate problem does not go away by itself: say so at once.
        # Only when no connection was made, though: TLS wording on a
        # connection that broke after a write went out proves nothing about
        # the write, which falls to the ambiguity rules below.
        return PermissionDeniedError(
            f"TLS handshake with etcd at {where} failed (check ca_cert, cert_key and "
            f"cert_cert): {details}"
        )
    if never_sent(code, details):
        return EtcdUnavailableError(f"etcd at {where} is unavailable: {details} ({name})")
    if code in (
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    ) or details.startswith(_AUTH_FAILED):
        return PermissionDeniedError(f"etcd at {where} refused the request: {details}")
    if details == _REQUEST_TOO_LARGE or "larger than max" in details:
        return ValueTooLargeError(f"request rejected as too large by etcd at {where}: {details}")
    if details == _LEASE_NOT_FOUND:
        return LeaseNotFoundError(details, code=code)
    if details == _NO_SPACE:
        return QuotaExceededError(
            f"etcd at {where} is out of space (its NOSPACE alarm is raised): free space, "
            "compact and defragment, then run 'etcdctl alarm disarm'",
            code=code,
        )
    if code in _AMBIGUOUS_CODES:
        if write:
            return OutcomeUnknownError(
                f"etcd at {where} did not confirm a write, which may or may not have "
                f"been applied: {details} ({name})"
            )
        return EtcdUnavailableError(f"etcd at {where} is unavailable: {details} ({name})")
    return EtcdError(f"etcd at {where} returned {name}: {details}", code=code)


def _translate_etcd3(exc: BaseException, *, where: str) -> EtcdPatternsError | None:
    if isinstance(exc, etcd3_exc.NoServerAvailableError):
        return EtcdUnavailableError(f"etcd at {where} is unavailable: no endpoint available")
    if isinstance(exc, (etcd3_exc.ConnectionFailedError, etcd3_exc.ConnectionTimeoutError)):
        return EtcdUnavailableError(f"etcd at {where} is unavailable: {exc}")
    if isinstance(exc, etcd3_exc.Etcd3Exception):
        return EtcdError(f"etcd at {where} failed: {exc!r}")
    return None
