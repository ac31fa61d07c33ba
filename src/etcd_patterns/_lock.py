"""Cluster-wide locks on etcd's own mutex protocol, with fencing tokens.

Protocol: the contender queue of `_contend`, shared with ``etcdctl lock``,
Go's ``concurrency.Mutex`` and etcd's server-side Lock service, so that each
excludes the others. A contender for lock ``name`` writes a key directly
under ``name/`` on its session lease; the key with the lowest create
revision holds the lock; each waiter watches only its predecessor; releasing
deletes the holder's key, guarded by its create revision. A key's value
says who holds it (host, pid and thread), for whoever looks.

Guarantees:

* While the session lease lives, at most one contender holds the lock, and
  waiters acquire in the order they registered (FIFO).
* The holder's fencing token, the create revision of its key, increases with
  every new holder. A write guarded by the lock (``transform(...,
  guard=held)``) applies only while the holder's key still exists with that
  token, so a holder that lost its lock cannot write through the library.
* A block may run longer than the TTL: the session's keepalive thread keeps
  the lease, and so the lock, alive for as long as the process lives.
* Locks are not re-entrant: a thread that asks for a lock it holds gets
  `LockReentryError` at once, rather than wait behind itself.

Lease loss: when the session lease expires (the process was paused or cut off
for longer than its TTL) or is revoked, etcd deletes the holder's key and the
next waiter takes over. The holder learns it three ways: ``held.lost`` is
set, guarded writes raise `LockLostError` and write nothing, and `lock`
raises `LockLostError` (with the block's result) after the block. No lease
can protect an unguarded write made after the loss: guard the writes that
matter.

Cost: an uncontended acquire-and-release is two round trips; a failed
`try_lock` is one. A contended acquisition adds one watch and one read per
predecessor that leaves, whatever the number of waiters, and one more read
for a waiter with fewer than three keys ahead when etcd moved on between
its registration and its watch (see `_contend`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, NamedTuple, TypeVar

from ._contend import Contenders, Won
from ._errors import (
    InvalidTypeError,
    LockLostError,
    LockReentryError,
    LockTimeoutError,
    NotALockError,
)
from ._fence import Fence, Holding, ThreadHolds, holder_info
from ._keys import Keyspace
from ._retry import Deadline, check_timeout
from ._session import Session, Sessions, check_ttl
from ._transport import Transport

T = TypeVar("T")


class TryLockResult(NamedTuple, Generic[T]):
    """The outcome of `EtcdPatterns.try_lock`.

    Attributes:
        revision: The etcd revision at which the attempt took effect.
        acquired: Whether the lock was free, so that the block ran.
        value: The block's result; None if the lock was held by another.
    """

    revision: int
    acquired: bool
    value: T | None


class HeldLock(Fence):
    """A lock held by this process: the facts a holder needs. A `Fence`.

    Attributes:
        name: The lock's name, without the namespace.
        key: This holder's key under ``name/``, without the namespace (what
            ``etcdctl lock`` calls ``ETCD_LOCK_KEY``).
        fencing_token: The create revision of `key`. It increases with every
            new holder: pass it to a storage system that rejects writes
            carrying an older token.
        lease_id: The session lease that `key` carries.
    """

    def __init__(
        self,
        *,
        name: str,
        key: str,
        etcd_key: bytes,
        fencing_token: int,
        session: Session,
        transport: Transport,
    ) -> None:
        super().__init__(
            etcd_key=etcd_key, fencing_token=fencing_token, session=session, transport=transport
        )
        self.name = name
        self.key = key
        # The thread object, not its ident: idents are reused once a thread
        # ends, and a new thread must not inherit a dead one's locks.
        self._thread = threading.current_thread()

    def __repr__(self) -> str:
        return f"<HeldLock {self.name!r} key={self.key!r} fencing_token={self.fencing_token}>"

    def _lost_error(self, consequence: str) -> LockLostError:
        return LockLostError(f"lock {self.name!r} is no longer held; {consequence}", name=self.name)


class Locks:
    """The lock pattern over one transport, namespace and set of sessions.

    Args:
        transport: Sends requests.
        keyspace: Maps lock names to etcd keys.
        sessions: Provides the session lease for each TTL.
    """

    def __init__(self, transport: Transport, keyspace: Keyspace, sessions: Sessions) -> None:
        self._transport = transport
        self._keyspace = keyspace
        self._sessions = sessions
        self._holds = ThreadHolds()
        self._contenders = Contenders(
            transport, keyspace, sessions, noun="lock", misuse=NotALockError
        )

    # -- the patterns -------------------------------------------------------

    def lock(
        self, name: object, block: object, *, ttl: object = None, timeout: object = None
    ) -> Any:
        """See `EtcdPatterns.lock`."""
        run = _check_block(block)
        return self._run_holding(self.acquire(name, ttl=ttl, timeout=timeout), run)

    def try_lock(self, name: object, block: object, *, ttl: object = None) -> TryLockResult[Any]:
        """See `EtcdPatterns.try_lock`."""
        run = _check_block(block)
        revision, held = self.try_acquire(name, ttl=ttl)
        if held is None:
            return TryLockResult(revision, False, None)
        return TryLockResult(revision, True, self._run_holding(held, run))

    def _run_holding(self, held: HeldLock, run: Callable[[], Any]) -> Any:
        """Run the block, release, and report a loss with the block's result."""
        try:
            result = run()
        except BaseException:
            self.release(held)
            raise
        if not self.release(held):
            raise LockLostError(
                f"lock {held.name!r} was lost while its block ran", name=held.name, result=result
            )
        return result

    # -- acquiring ----------------------------------------------------------

    def acquire(self, name: object, *, ttl: object = None, timeout: object = None) -> HeldLock:
        """Wait for the lock; see `EtcdPatterns.locked`."""
        raw = self._keyspace.encode(name, name="lock name", trailing_slash=True)
        lease_ttl = None if ttl is None else check_ttl(ttl)
        deadline = Deadline(check_timeout(timeout))
        self._check_reentry(raw)
        won = self._contenders.contend(
            raw,
            holder_info(),
            lease_ttl=lease_ttl,
            deadline=deadline,
            timeout_error=lambda: self._timeout(raw),
        )
        return self._hold(raw, won)

    def try_acquire(self, name: object, *, ttl: object = None) -> tuple[int, HeldLock | None]:
        """One attempt, one round trip; see `EtcdPatterns.try_locked`."""
        raw = self._keyspace.encode(name, name="lock name", trailing_slash=True)
        lease_ttl = None if ttl is None else check_ttl(ttl)
        self._check_reentry(raw)
        attempt = self._contenders.try_win(raw, holder_info(), lease_ttl=lease_ttl)
        if attempt.won is None:
            return attempt.revision, None
        return attempt.revision, self._hold(raw, attempt.won)

    def _hold(self, raw: bytes, won: Won) -> HeldLock:
        held = HeldLock(
            name=self._keyspace.decode(raw),
            key=self._keyspace.decode(won.key),
            etcd_key=won.key,
            fencing_token=won.revision,
            session=won.session,
            transport=self._transport,
        )
        self._holds.add(raw, held, held._thread)
        return held

    # -- releasing ----------------------------------------------------------

    def release(self, held: HeldLock) -> bool:
        """Delete the holder's key, if it is still this holder's.

        Returns:
            False if the key was already gone: the lock had been lost. True
            otherwise, including when etcd could not be reached, in which
            case the session deletes the key as soon as etcd answers again.
        """
        raw = held.etcd_key.rpartition(b"/")[0]
        self._holds.discard(raw, held, held._thread)
        return self._contenders.leave(held.etcd_key, held.fencing_token, held._session)

    # -- helpers ------------------------------------------------------------

    def _check_reentry(self, raw: bytes) -> None:
        if self._holds.holds(raw):
            raise LockReentryError(
                f"this thread already holds lock {self._keyspace.decode(raw)!r}; "
                "locks are not re-entrant"
            )

    def _timeout(self, raw: bytes) -> LockTimeoutError:
        return LockTimeoutError(f"lock {self._keyspace.decode(raw)!r} not acquired in time")


def _check_block(block: object) -> Callable[[], Any]:
    if not callable(block):
        raise InvalidTypeError(f"block must be callable, not {type(block).__name__}")
    run: Callable[[], Any] = block
    return run


class Locked(Holding[HeldLock]):
    """Context manager of `EtcdPatterns.locked`: holds the lock or raises."""

    def __init__(self, locks: Locks, name: object, ttl: object, timeout: object) -> None:
        super().__init__(
            lambda: locks.acquire(name, ttl=ttl, timeout=timeout),
            locks.release,
            lost="it was lost while held",
        )


class TryLocked:
    """Context manager of `EtcdPatterns.try_locked`: a handle, or None if held elsewhere."""

    def __init__(self, locks: Locks, name: object, ttl: object) -> None:
        self._locks = locks
        self._args = (name, ttl)
        self._holding: Holding[HeldLock] | None = None

    def __enter__(self) -> HeldLock | None:
        name, ttl = self._args
        _, held = self._locks.try_acquire(name, ttl=ttl)
        if held is None:
            return None
        self._holding = Holding(lambda: held, self._locks.release, lost="it was lost while held")
        return self._holding.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        holding, self._holding = self._holding, None
        if holding is not None:
            holding.__exit__(exc_type, exc, traceback)
