"""Cluster-wide locks on etcd's own mutex protocol, with fencing tokens.

Protocol, shared with ``etcdctl lock``, Go's ``concurrency.Mutex`` and etcd's
server-side Lock service, so that each excludes the others:

* A contender for lock ``name`` writes a key directly under ``name/``,
  carrying its session lease.
* The holder is the key with the lowest create revision under ``name/``.
* Acquiring is one transaction that registers my key and, in the same round
  trip, reads the newest key created before it: my predecessor. With no
  predecessor, I hold the lock. Otherwise I watch the predecessor's key, and
  only it (no thundering herd), until it is deleted; then I re-read, in one
  round trip, my own key and my new predecessor, if any. I report success
  only once my own key is confirmed to still exist.
* Releasing deletes my key, guarded by its create revision: never anyone
  else's, even after my lease expired and the name was taken over.
* A waiter that gives up (timeout, exception, Ctrl-C) deletes its key.

Guarantees:

* While the session lease lives, at most one contender holds the lock, and
  waiters acquire in the order they registered (FIFO).
* The holder's fencing token, the create revision of its key, increases with
  every new holder. A write guarded by the lock (``transform(...,
  guard=held)``) applies only while the holder's key still exists with that
  token, so a holder that lost its lock cannot write through the library.
* A block may run longer than the TTL: the session's keepalive thread keeps
  the lease, and so the lock, alive for as long as the process lives.

Lease loss: when the session lease expires (the process was paused or cut off
for longer than its TTL) or is revoked, etcd deletes the holder's key and the
next waiter takes over. The holder learns it three ways: ``held.lost`` is
set, guarded writes raise `LockLostError` and write nothing, and `lock`
raises `LockLostError` (with the block's result) after the block. No lease
can protect an unguarded write made after the loss: guard the writes that
matter.

Cost: an uncontended acquire-and-release is two round trips; a failed
`try_lock` is one. A contended acquisition adds one watch and one read per
predecessor that leaves, whatever the number of waiters.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, NamedTuple, TypeVar

from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from . import _ops as ops
from ._commit import commit
from ._errors import (
    EtcdPatternsError,
    InvalidTypeError,
    LockLostError,
    LockReentryError,
    LockTimeoutError,
    NotALockError,
    OutcomeUnknownError,
)
from ._fence import Fence
from ._keys import Keyspace, children_range
from ._retry import Deadline, check_timeout
from ._session import Orphan, Session, Sessions, check_ttl
from ._transport import Transport
from ._wait import Watch, wait

T = TypeVar("T")

_DELETE = kv_pb2.Event.DELETE


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


class _Turn(NamedTuple):
    """Where a contender stands, from one read.

    Attributes:
        exists: Whether my key is still there.
        predecessor: The newest key created before mine (keys only); None
            if there is none, so that, if my key exists, I hold the lock.
        revision: The revision the read reflects.
    """

    exists: bool
    predecessor: Any | None
    revision: int


class _Registration(NamedTuple):
    """A contender key written by `Locks._register`.

    Attributes:
        revision: The key's create revision: the fencing token, if it wins.
        session: The session whose lease the key carries.
        turn: Where the key stood when it was written.
    """

    revision: int
    session: Session
    turn: _Turn


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


def _holder_info() -> bytes:
    """The value of a contender key: who holds it, for whoever looks."""
    thread = threading.current_thread().name
    return f"{socket.gethostname()} pid={os.getpid()} thread={thread}".encode()


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
        self._held: dict[tuple[threading.Thread, bytes], HeldLock] = {}
        self._registry = threading.Lock()
        self._sequence = itertools.count(1)
        self._instance = secrets.token_hex(8)

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
        while True:
            my_key = self._contender_key(raw)
            try:
                registered = self._register(raw, my_key, lease_ttl)
            except BaseException as exc:
                self._withdraw_unsettled(lease_ttl, my_key, exc)
                raise
            revision, session = registered.revision, registered.session
            try:
                if self._wait_turn(
                    raw, my_key, revision, session, turn=registered.turn, deadline=deadline
                ):
                    return self._hold(raw, my_key, revision, session)
            except BaseException:
                self._give_up(my_key, revision, session)
                raise
            # My key vanished: the session was lost. Queue again on a fresh
            # one, unless time is up; like any new contender, at the back.
            # Should the old lease live after all, its key must not stay
            # ahead of the new one.
            session.abandon(Orphan(my_key, revision))
            if deadline.expired():
                raise self._timeout(raw)

    def try_acquire(self, name: object, *, ttl: object = None) -> tuple[int, HeldLock | None]:
        """One attempt, one round trip; see `EtcdPatterns.try_locked`."""
        raw = self._keyspace.encode(name, name="lock name", trailing_slash=True)
        lease_ttl = None if ttl is None else check_ttl(ttl)
        self._check_reentry(raw)
        start, end = children_range(raw)
        my_key = self._contender_key(raw)
        try:
            # Free means no contender at all: an empty range compares as a
            # key with create revision 0.
            committed = commit(
                self._transport,
                lambda: self._sessions.get(lease_ttl),
                compare=[
                    ops.compare_create(start, "==", 0, range_end=end),
                    ops.compare_version(raw, "==", 0),
                ],
                success=lambda session: [ops.put(my_key, _holder_info(), lease=session.lease_id)],
                failure=[
                    ops.get(raw, keys_only=True),
                    ops.get(start, end, oldest_first=True, limit=1, keys_only=True),
                ],
            )
        except BaseException as exc:
            self._withdraw_unsettled(lease_ttl, my_key, exc)
            raise
        if committed.succeeded:
            return committed.revision, self._hold(
                raw, my_key, committed.revision, committed.session
            )
        assert committed.responses is not None  # failures always carry responses
        if ops.kvs(committed.responses, 0):
            raise self._not_a_lock(raw)
        (holder,) = ops.kvs(committed.responses, 1) or [None]
        if holder is not None and not holder.lease:
            raise self._data_under_lock(raw, holder.key)
        return committed.revision, None

    def _register(self, raw: bytes, my_key: bytes, lease_ttl: int | None) -> _Registration:
        """Write my key and read my predecessor in one round trip.

        The write goes through the exactly-once commit: a copy of it that
        etcd receives late can never create my key a second time (after I
        released it, say), which would leave a contender that nobody owns.
        """
        start, end = children_range(raw)
        committed = commit(
            self._transport,
            lambda: self._sessions.get(lease_ttl),
            compare=[ops.compare_version(raw, "==", 0)],
            # The range runs before the put, so it sees the newest key
            # created before mine.
            success=lambda session: [
                ops.get(start, end, newest_first=True, limit=1, keys_only=True),
                ops.put(my_key, _holder_info(), lease=session.lease_id),
            ],
            failure=[ops.get(raw, keys_only=True)],
        )
        if not committed.succeeded:
            raise self._not_a_lock(raw)
        revision = committed.revision
        if committed.responses is None:
            # Settled after a lost answer: read what the answer would have
            # said, and whether my key is still there to say it of.
            turn = self._check_turn(raw, my_key, revision)
        else:
            (predecessor,) = ops.kvs(committed.responses, 0) or [None]
            turn = _Turn(exists=True, predecessor=predecessor, revision=revision)
        return _Registration(revision, committed.session, turn)

    def _check_turn(self, raw: bytes, my_key: bytes, revision: int) -> _Turn:
        """Whether my key exists, and my current predecessor, in one round trip."""
        start, end = children_range(raw)
        request = ops.txn(
            compare=[],
            success=[
                ops.get(my_key, keys_only=True),
                ops.get(
                    start,
                    end,
                    newest_first=True,
                    limit=1,
                    keys_only=True,
                    max_create_revision=revision - 1,
                ),
            ],
            failure=[],
        )
        response = self._transport.txn(request, write=False)
        (predecessor,) = ops.kvs(response.responses, 1) or [None]
        return _Turn(
            exists=bool(ops.kvs(response.responses, 0)),
            predecessor=predecessor,
            revision=response.header.revision,
        )

    def _wait_turn(
        self,
        raw: bytes,
        my_key: bytes,
        revision: int,
        session: Session,
        *,
        turn: _Turn,
        deadline: Deadline,
    ) -> bool:
        """Wait until I hold the lock (True), or my key or session is gone (False).

        True is only ever reported from a read that saw my key.

        Raises:
            NotALockError: A key without a lease is queued before mine: data
                stored under the lock's name, which no holder would ever
                delete.
        """

        def watch(turn: _Turn) -> Watch | None:
            if not turn.exists or turn.predecessor is None or session.lost.is_set():
                return None
            if not turn.predecessor.lease:
                raise self._data_under_lock(raw, turn.predecessor.key)
            # Only the predecessor: no herd.
            create = etcdrpc.WatchCreateRequest(
                key=turn.predecessor.key, filters=[etcdrpc.WatchCreateRequest.NOPUT]
            )
            return Watch([create], lambda event: event.type == _DELETE)

        final = wait(
            self._transport,
            turn,
            read=lambda: self._check_turn(raw, my_key, revision),
            watch=watch,
            deadline=deadline,
            timeout_error=lambda: self._timeout(raw),
        )
        return final.exists and final.predecessor is None

    def _hold(self, raw: bytes, my_key: bytes, revision: int, session: Session) -> HeldLock:
        held = HeldLock(
            name=self._keyspace.decode(raw),
            key=self._keyspace.decode(my_key),
            etcd_key=my_key,
            fencing_token=revision,
            session=session,
            transport=self._transport,
        )
        with self._registry:
            self._held[(held._thread, raw)] = held
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
        with self._registry:
            if self._held.get((held._thread, raw)) is held:
                del self._held[(held._thread, raw)]
        request = ops.delete_if_created(held.etcd_key, held.fencing_token)
        try:
            try:
                return bool(self._transport.txn(request).succeeded)
            except OutcomeUnknownError:
                # A second copy can only delete this holder's key, so it is
                # safe to send; but if the first copy did delete it, the
                # second finds it gone. The key vanishes without us only
                # with its lease, so a live lease means the first copy did.
                if self._transport.txn(request, write=False).succeeded:
                    return True
                return self._transport.lease_time_to_live(held.lease_id) > 0
        except EtcdPatternsError:
            held._session.abandon(Orphan(held.etcd_key, held.fencing_token))
            return True
        except BaseException:
            held._session.abandon(Orphan(held.etcd_key, held.fencing_token))  # Ctrl-C: still let go
            raise

    def _give_up(self, my_key: bytes, revision: int, session: Session) -> None:
        """Withdraw a waiter's key now; if etcd is away, the session will."""
        session.withdraw(Orphan(my_key, revision))

    def _withdraw_unsettled(self, lease_ttl: int | None, my_key: bytes, exc: BaseException) -> None:
        """Never leave a contender behind when registering ``my_key`` did not return.

        The key's name is this attempt's alone, so it is deleted by name.
        """
        if isinstance(exc, EtcdPatternsError):
            # etcd failed us, so a delete now would likely fail too: the
            # session deletes the key once etcd answers, if its lease still
            # carries one.
            self._sessions.abandon(lease_ttl, Orphan(my_key))
        else:
            # Interrupted (Ctrl-C): the commit has settled the write, so no
            # late copy can create the key after this delete.
            self._sessions.withdraw(lease_ttl, Orphan(my_key))

    # -- helpers ------------------------------------------------------------

    def _contender_key(self, raw: bytes) -> bytes:
        # Unique to this instance and attempt, and known before the session
        # that will carry it, so that an unsettled attempt can be withdrawn.
        return raw + f"/{self._instance}-{next(self._sequence)}".encode()

    def _check_reentry(self, raw: bytes) -> None:
        with self._registry:
            if (threading.current_thread(), raw) in self._held:
                raise LockReentryError(
                    f"this thread already holds lock {self._keyspace.decode(raw)!r}; "
                    "locks are not re-entrant"
                )

    def _timeout(self, raw: bytes) -> LockTimeoutError:
        return LockTimeoutError(f"lock {self._keyspace.decode(raw)!r} not acquired in time")

    def _data_under_lock(self, raw: bytes, key: bytes) -> NotALockError:
        return NotALockError(
            f"key {self._keyspace.decode(key)!r} under lock {self._keyspace.decode(raw)!r} "
            "carries no lease, so it is data, not a contender, and would hold the lock "
            "for ever; store data outside the lock's directory"
        )

    def _not_a_lock(self, raw: bytes) -> NotALockError:
        return NotALockError(
            f"lock name {self._keyspace.decode(raw)!r} is a key that holds a value; "
            "a lock needs a name of its own"
        )


def _check_block(block: object) -> Callable[[], Any]:
    if not callable(block):
        raise InvalidTypeError(f"block must be callable, not {type(block).__name__}")
    run: Callable[[], Any] = block
    return run


class _Holding:
    """Releases a held lock on leaving a ``with`` block."""

    def __init__(self, locks: Locks) -> None:
        self._locks = locks
        self._held: HeldLock | None = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        held, self._held = self._held, None
        if held is not None and not self._locks.release(held) and exc_type is None:
            raise LockLostError(f"lock {held.name!r} was lost while held", name=held.name)


class Locked(_Holding):
    """Context manager of `EtcdPatterns.locked`: holds the lock or raises."""

    def __init__(self, locks: Locks, name: object, ttl: object, timeout: object) -> None:
        super().__init__(locks)
        self._args = (name, ttl, timeout)

    def __enter__(self) -> HeldLock:
        name, ttl, timeout = self._args
        self._held = self._locks.acquire(name, ttl=ttl, timeout=timeout)
        return self._held


class TryLocked(_Holding):
    """Context manager of `EtcdPatterns.try_locked`: a handle, or None if held elsewhere."""

    def __init__(self, locks: Locks, name: object, ttl: object) -> None:
        super().__init__(locks)
        self._args = (name, ttl)

    def __enter__(self) -> HeldLock | None:
        name, ttl = self._args
        _, self._held = self._locks.try_acquire(name, ttl=ttl)
        return self._held
