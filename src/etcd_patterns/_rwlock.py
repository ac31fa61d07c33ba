"""Read-write locks on the layout of etcd's Go recipe: many readers or one writer, fair, fenced.

Protocol, the layout of etcd's Go ``recipe.RWMutex``, so that it and this
lock exclude each other: the contender queue of `_contend`, with two kinds
of keys.

* A reader writes a key under ``name/read/``, a writer under
  ``name/write/``, each carrying its session lease, and in the same round
  trip reads the key it queues behind:

  - a reader, the newest *writer* key created before its own;
  - a writer, the newest key of either kind created before its own.

* A contender holds the lock once no such key is left: readers share it,
  a writer holds it alone.
* A waiter watches that one key, and only it, until it is deleted; then it
  re-reads, in one round trip, its own key and the key it now queues
  behind. It holds the lock only from a read that saw its own key.
* Releasing deletes the holder's key, guarded by its create revision.

Guarantees:

* While leases live, no reader holds the lock while a writer does, and no
  two writers hold it at once; readers hold it together.
* Fair, in registration order: a reader that arrives after a waiting writer
  queues behind that writer, so a stream of readers never starves a
  writer; a writer waits only for the keys registered before its own.
* No herd: a release wakes only the waiters that queued behind that very
  key; the readers behind a writer all wake when it goes, and all hold.
* A handle is a `Fence`: a write guarded by it applies only while the lock
  is held. Writers' fencing tokens increase from writer to writer; readers
  that hold at once have tokens in no particular order.
* Not re-entrant: a thread that asks for a lock it holds, in either mode,
  gets `LockReentryError` at once, rather than wait behind itself.

Cost: an uncontended read or write cycle is two round trips; each key a
waiter queues behind costs it one watch and one read when it goes.

Lease loss: etcd deletes the holder's key, and the waiters behind it go on.
The holder learns it from ``held.lost``, from guarded writes, which raise
`LockLostError` and write nothing, and on leaving the ``with`` block, which
raises `LockLostError`.
"""

from __future__ import annotations

import threading

from ._contend import Contenders, Line, Won
from ._errors import LockLostError, LockReentryError, LockTimeoutError, NotALockError
from ._fence import Fence, Holding, ThreadHolds, holder_info
from ._keys import Keyspace, children_range, prefix_end
from ._retry import Deadline, check_timeout
from ._session import Session, Sessions, check_ttl
from ._transport import Transport

READ, WRITE = "read", "write"


class HeldRWLock(Fence):
    """A read-write lock held by this process, in one mode. A `Fence`.

    Attributes:
        name: The lock's name, without the namespace.
        key: This holder's key, ``name/read/…`` or ``name/write/…``, without
            the namespace.
        mode: ``"read"`` or ``"write"``.
        fencing_token: The create revision of `key`.
        lease_id: The session lease that `key` carries.
    """

    def __init__(
        self,
        *,
        name: str,
        key: str,
        mode: str,
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
        self.mode = mode
        self._thread = threading.current_thread()

    def __repr__(self) -> str:
        return (
            f"<HeldRWLock {self.name!r} {self.mode} key={self.key!r} "
            f"fencing_token={self.fencing_token}>"
        )

    def _lost_error(self, consequence: str) -> LockLostError:
        return LockLostError(
            f"{self.mode} lock {self.name!r} is no longer held; {consequence}", name=self.name
        )


class RWLocks:
    """The read-write lock pattern over one transport, namespace and set of sessions.

    Args:
        transport: Sends requests.
        keyspace: Maps lock names to etcd keys.
        sessions: Provides the session lease for each TTL.
    """

    def __init__(self, transport: Transport, keyspace: Keyspace, sessions: Sessions) -> None:
        self._transport = transport
        self._keyspace = keyspace
        self._contenders = Contenders(
            transport, keyspace, sessions, noun="read-write lock", misuse=NotALockError
        )
        self._holds = ThreadHolds()

    def acquire(
        self, name: object, mode: str, *, ttl: object = None, timeout: object = None
    ) -> HeldRWLock:
        """Wait for the lock in ``mode``; see `EtcdPatterns.read_locked`."""
        raw = self._keyspace.encode(name, name="lock name", trailing_slash=True)
        lease_ttl = None if ttl is None else check_ttl(ttl)
        deadline = Deadline(check_timeout(timeout))
        if self._holds.holds(raw):
            raise LockReentryError(
                f"this thread already holds read-write lock {self._keyspace.decode(raw)!r}; "
                "it is not re-entrant, in either mode"
            )
        if mode == READ:
            writers = raw + b"/write/"
            behind = (writers, prefix_end(writers))  # the writers only
        else:
            behind = children_range(raw)  # every key
        won = self._contenders.contend(
            raw,
            holder_info(),
            lease_ttl=lease_ttl,
            deadline=deadline,
            timeout_error=lambda: LockTimeoutError(
                f"{mode} lock {self._keyspace.decode(raw)!r} not acquired in time"
            ),
            # A reader queues behind writers only, who win one at a time in
            # order; a writer behind readers too, who win together.
            line=Line(raw + f"/{mode}".encode(), behind, in_order=mode == READ),
        )
        held = self._hold(raw, mode, won)
        self._holds.add(raw, held, held._thread)
        return held

    def release(self, held: HeldRWLock) -> bool:
        """Delete the holder's key; False if the lock had been lost."""
        raw = held.etcd_key.rsplit(b"/", 2)[0]
        self._holds.discard(raw, held, held._thread)
        return self._contenders.leave(held.etcd_key, held.fencing_token, held._session)

    def _hold(self, raw: bytes, mode: str, won: Won) -> HeldRWLock:
        return HeldRWLock(
            name=self._keyspace.decode(raw),
            key=self._keyspace.decode(won.key),
            mode=mode,
            etcd_key=won.key,
            fencing_token=won.revision,
            session=won.session,
            transport=self._transport,
        )


class RWLocked(Holding[HeldRWLock]):
    """Context manager of `EtcdPatterns.read_locked` and `EtcdPatterns.write_locked`."""

    def __init__(
        self, locks: RWLocks, name: object, mode: str, ttl: object, timeout: object
    ) -> None:
        super().__init__(
            lambda: locks.acquire(name, mode, ttl=ttl, timeout=timeout),
            locks.release,
            lost="it was lost while held",
        )
