"""Counting semaphores: at most ``limit`` holders at once, first come first served, fenced.

Protocol: the contender queue of `_contend`, with ``limit`` places:

* A contender for semaphore ``name`` writes a key directly under ``name/``,
  carrying its session lease, and in the same round trip reads the
  ``limit`` newest keys created before its own.
* A contender holds a permit when fewer than ``limit`` keys were created
  before its own: the oldest ``limit`` keys hold the permits.
* A waiter watches the ``limit`` keys just ahead of it (each key, or, past
  8, the directory's deletions, filtered): while all of them exist it
  cannot hold a permit, so only the deletion of one of them can let it in.
  Each deletion wakes at most the ``limit`` waiters right behind it.
* Releasing deletes the holder's key, guarded by its create revision.

The limit is recorded at ``name`` itself, as ``semaphore limit=N``, so that
every contender agrees on it:

* The first contender writes it along with its registration, in one
  transaction that applies only if nobody is queued and nothing is
  recorded. Later contenders register only while the record equals their
  ``limit``; one that passes another limit gets `SemaphoreLimitError`, and
  nothing is written.
* The last holder to leave deletes the record, in the transaction that
  deletes its key. A record left by holders that all crashed is stale once
  nobody is queued: the next contender overwrites it.

Guarantees:

* While leases live, at most ``limit`` contenders hold permits at once, and
  waiters are let in in the order they registered (FIFO).
* A permit is a `Fence`: its fencing token, the create revision of its key,
  is unique to it, and a write guarded by it (``guard=permit``) applies only
  while the permit is held.
* A waiter that times out, raises or is interrupted leaves no key behind.

Cost: an uncontended acquire-and-release is two round trips, whether or not
the limit is recorded yet; a contender that finds others queued pays one
more. Each waiter pays one watch and one read per wake-up.

Lease loss: etcd deletes the holder's key, and the next waiter takes the
permit. The holder learns it from ``permit.lost``, from guarded writes,
which raise `LockLostError` and write nothing, and on leaving the ``with``
block, which raises `LockLostError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import _ops as ops
from ._contend import Contenders, Entry, Won
from ._errors import (
    LockLostError,
    NotALockError,
    SemaphoreLimitError,
    SemaphoreTimeoutError,
)
from ._fence import Fence, Holding, holder_info
from ._keys import Keyspace, children_range
from ._retry import Deadline, check_count, check_timeout
from ._session import Session, Sessions, check_ttl
from ._transport import Transport


class Permit(Fence):
    """A permit of a semaphore, held by this process. A `Fence`.

    Attributes:
        name: The semaphore's name, without the namespace.
        key: This holder's key under ``name/``, without the namespace.
        limit: How many permits the semaphore has.
        fencing_token: The create revision of `key`, unique to this permit.
        lease_id: The session lease that `key` carries.
    """

    def __init__(
        self,
        *,
        name: str,
        key: str,
        limit: int,
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
        self.limit = limit

    def __repr__(self) -> str:
        return (
            f"<Permit {self.name!r} of {self.limit} key={self.key!r} "
            f"fencing_token={self.fencing_token}>"
        )

    def _lost_error(self, consequence: str) -> LockLostError:
        return LockLostError(
            f"a permit of semaphore {self.name!r} is no longer held; {consequence}",
            name=self.name,
        )


class Semaphores:
    """The semaphore pattern over one transport, namespace and set of sessions.

    Args:
        transport: Sends requests.
        keyspace: Maps semaphore names to etcd keys.
        sessions: Provides the session lease for each TTL.
    """

    def __init__(self, transport: Transport, keyspace: Keyspace, sessions: Sessions) -> None:
        self._transport = transport
        self._keyspace = keyspace
        self._contenders = Contenders(
            transport, keyspace, sessions, noun="semaphore", misuse=NotALockError
        )
        # Per semaphore, whether the last registration found others queued:
        # the next one starts with the entry that worked, and so needs no
        # more than one round trip in a steady state, contended or not.
        self._queued: dict[bytes, bool] = {}

    def acquire(
        self, name: object, limit: object, *, ttl: object = None, timeout: object = None
    ) -> Permit:
        """Wait for a permit; see `EtcdPatterns.semaphore`."""
        raw = self._keyspace.encode(name, name="semaphore name", trailing_slash=True)
        places = check_count(limit, name="limit")
        lease_ttl = None if ttl is None else check_ttl(ttl)
        deadline = Deadline(check_timeout(timeout))
        won = self._contenders.contend(
            raw,
            holder_info(),
            lease_ttl=lease_ttl,
            deadline=deadline,
            timeout_error=lambda: SemaphoreTimeoutError(
                f"no permit of semaphore {self._keyspace.decode(raw)!r} in time"
            ),
            places=places,
            entry=self._equal(raw, places) if self._queued.get(raw) else self._first(raw, places),
        )
        return self._hold(raw, places, won)

    def release(self, permit: Permit) -> bool:
        """Give the permit back; False if it had been lost.

        The last holder also deletes the recorded limit, in the same
        transaction.
        """
        raw = permit.etcd_key.rpartition(b"/")[0]
        start, end = children_range(raw)
        forget = ops.nested(
            compare=[
                # Every key under name/ is mine: I am the last.
                ops.compare_create(start, "==", permit.fencing_token, range_end=end),
                ops.compare_value(raw, "==", _record(permit.limit)),
            ],
            success=[ops.delete(raw)],
            failure=[],
        )
        return self._contenders.leave(
            permit.etcd_key, permit.fencing_token, permit._session, also=[forget]
        )

    # -- the recorded limit -------------------------------------------------

    def _first(self, raw: bytes, limit: int) -> Entry:
        """Register as the first contender, recording the limit."""
        start, end = children_range(raw)
        self._queued[raw] = False
        return self._entry(
            raw,
            limit,
            compare=[
                ops.compare_create(start, "==", 0, range_end=end),
                ops.compare_version(raw, "==", 0),
            ],
            record=True,
        )

    def _equal(self, raw: bytes, limit: int, recorded: bytes | None = None) -> Entry:
        """Register behind others, whose recorded limit is mine."""
        self._queued[raw] = True
        record = _record(limit) if recorded is None else recorded
        return self._entry(raw, limit, compare=[ops.compare_value(raw, "==", record)])

    def _entry(
        self, raw: bytes, limit: int, *, compare: Sequence[Any], record: bool = False
    ) -> Entry:
        start, end = children_range(raw)
        return Entry(
            compare=compare,
            success=[ops.put(raw, _record(limit))] if record else [],
            failure=[ops.get(raw), ops.get(start, end, limit=1, keys_only=True)],
            refused=lambda responses: self._refused(raw, limit, responses),
        )

    def _refused(self, raw: bytes, limit: int, responses: Sequence[Any]) -> Entry:
        """The entry to register with next, from what the refused one read."""
        (found,) = ops.kvs(responses, 0) or [None]
        queued = bool(ops.kvs(responses, 1))
        start, end = children_range(raw)
        name = self._keyspace.decode(raw)
        if found is None:
            if not queued:
                return self._first(raw, limit)
            # Others queued, and the record deleted from outside: record it.
            return self._entry(raw, limit, compare=[ops.compare_version(raw, "==", 0)], record=True)
        recorded = _recorded_limit(found.value)
        if recorded is None:
            raise NotALockError(
                f"semaphore name {name!r} is a key that holds a value other than a limit; "
                "a semaphore needs a name of its own"
            )
        if recorded == limit:
            return self._equal(raw, limit, found.value)
        if queued:
            raise SemaphoreLimitError(
                f"semaphore {name!r} has {recorded} permits, not {limit}: "
                "every contender must pass the same limit",
                recorded=recorded,
            )
        # A limit left by holders that are all gone: overwrite it.
        return self._entry(
            raw,
            limit,
            compare=[
                ops.compare_create(start, "==", 0, range_end=end),
                ops.compare_mod(raw, "==", found.mod_revision),
            ],
            record=True,
        )

    def _hold(self, raw: bytes, limit: int, won: Won) -> Permit:
        return Permit(
            name=self._keyspace.decode(raw),
            key=self._keyspace.decode(won.key),
            limit=limit,
            etcd_key=won.key,
            fencing_token=won.revision,
            session=won.session,
            transport=self._transport,
        )


_RECORD = "semaphore limit="


def _record(limit: int) -> bytes:
    """The value recorded at a semaphore's name: its limit, unmistakable for data."""
    return f"{_RECORD}{limit}".encode()


def _recorded_limit(value: bytes) -> int | None:
    """The limit a record holds, or None if it is not a semaphore's record."""
    text = value.decode("ascii", "replace")
    if not text.startswith(_RECORD):
        return None
    number = text.removeprefix(_RECORD)
    return int(number) if number.isdecimal() and int(number) >= 1 else None


class Semaphored(Holding[Permit]):
    """Context manager of `EtcdPatterns.semaphore`: holds a permit, or raises."""

    def __init__(
        self, semaphores: Semaphores, name: object, limit: object, ttl: object, timeout: object
    ) -> None:
        super().__init__(
            lambda: semaphores.acquire(name, limit, ttl=ttl, timeout=timeout),
            semaphores.release,
            lost="it was lost while held",
        )
