"""The session: one lease, kept alive by a background thread.

Every key a pattern writes on behalf of a live process carries the session
lease, so a process that crashes releases everything it held once the lease
runs out: ``ttl`` seconds after its last keepalive. While the process lives,
a daemon thread refreshes the lease about every ``ttl / 3`` seconds.

Lease loss: only etcd decides that a lease is gone. When a refresh reports
it expired or revoked (or a write finds it missing), the session sets its
`lost` event and refreshes no more; `Sessions` hands out a fresh session on
the next use, and keys written under the lost lease are gone. While etcd
cannot be reached, the thread keeps trying every half second: a new etcd
leader extends every lease by its TTL, so a lease may well outlive an outage
longer than its TTL, and giving up on it locally would let it expire for
real. `Session.confirmed_until` tells until when etcd surely held the lease;
past it, the lease may or may not be gone.

A key that a pattern means to delete at once (a waiter that gives up, on a
timeout, an error or Ctrl-C) goes through `Session.withdraw`: one delete on
the caller's thread, bounded by `CLEANUP_TIMEOUT`, so that the key is gone
before the call returns whenever etcd answers. A key that could not be
deleted (etcd was away, or the delete was itself interrupted) is handed to
`Session.abandon`; the keepalive thread deletes it once etcd answers again,
so it never outlives its purpose by more than a refresh interval while the
process lives.

`close` stops the thread and revokes the lease, deleting its keys, and
prints nothing. At interpreter exit, every session this process opened and
did not close is closed the same way, so that a script that never closes its
instance frees its locks and claims at once rather than a TTL later. A
forked child never revokes a lease its parent opened, at exit or on
`close`. Logging goes to the ``etcd_patterns`` logger: a lost lease
at WARNING, refresh failures and cleanup at DEBUG.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from . import _ops as ops
from ._errors import (
    ClosedError,
    EtcdPatternsError,
    EtcdUnavailableError,
    InvalidArgumentError,
    InvalidTypeError,
)
from ._keys import Keyspace
from ._retry import Deadline
from ._transport import CLEANUP_TIMEOUT, Transport

log = logging.getLogger("etcd_patterns")

__all__ = ["CLEANUP_TIMEOUT", "Orphan", "Session", "Sessions", "Slot", "check_ttl"]


def check_ttl(ttl: object, *, name: str = "ttl") -> int:
    """Validate a lease TTL: a finite number of seconds > 0, rounded up."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise InvalidTypeError(f"{name} must be a number of seconds, not {ttl!r}")
    if not math.isfinite(ttl) or ttl <= 0:
        raise InvalidArgumentError(f"{name} must be a finite number > 0, not {ttl!r}")
    return math.ceil(ttl)


@dataclass(frozen=True)
class Orphan:
    """A key this session wrote and means to delete, and how to tell it is still ours.

    Attributes:
        key: The etcd key.
        create_revision: Delete it only if it is this incarnation; None if
            the revision is unknown (a write whose answer never came).
        value: With no revision: delete it only if it still holds this
            value, which the write made unique to itself. Without either,
            the key's name must be unique to the write.

    A key of unknown revision is deleted only while it carries this
    session's lease, too.
    """

    key: bytes
    create_revision: int | None = None
    value: bytes | None = None


@dataclass
class Slot:
    """A bookkeeping key, on the session lease, owned by one operation at a time.

    Attributes:
        key: The etcd key.
        token: The value this session last wrote to it; None if it has
            never been written (or vanished with its lease).
    """

    key: bytes
    token: str | None = None


# The sessions this process opened and has not closed, for the exit hook.
_open_sessions: weakref.WeakSet[Session] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Revoke the leases of sessions left open, each bounded by CLEANUP_TIMEOUT."""
    for session in list(_open_sessions):
        try:
            session.close()
        except Exception as exc:  # exiting: nothing must be printed
            log.debug("could not close %r at exit: %s", session, exc)


class Session:
    """A lease plus the thread that keeps it alive.

    Args:
        transport: Sends the lease requests.
        keyspace: Names the session's bookkeeping keys.
        ttl: The requested lease TTL in seconds. etcd may grant more.
    """

    def __init__(self, transport: Transport, keyspace: Keyspace, ttl: int) -> None:
        self._transport = transport
        self._keyspace = keyspace
        started = time.monotonic()
        response = transport.lease_grant(ttl)
        self.lease_id: int = response.ID
        self.ttl: int = response.TTL
        self.lost = threading.Event()
        self._marked_lost = False
        self.confirmed_until: float = started + self.ttl
        """The `time.monotonic` instant until which etcd surely holds the lease."""
        self._stop = threading.Event()
        self._abandoned: list[Orphan] = []
        self._slots: list[Slot] = []
        self._slot_count = 0
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._thread = threading.Thread(
            target=self._keep_alive,
            name=f"etcd-patterns-keepalive-{self.lease_id:x}",
            daemon=True,
        )
        self._thread.start()
        _open_sessions.add(self)

    def __repr__(self) -> str:
        state = "lost" if self.lost.is_set() else "alive"
        return f"<Session lease={self.lease_id:x} ttl={self.ttl} {state}>"

    def mark_lost(self, reason: str) -> None:
        """Declare the lease lost: signal `lost` and stop refreshing."""
        with self._lock:
            first, self._marked_lost = not self._marked_lost, True
        if first:
            # Logged before `lost` is set: whoever wakes on `lost` finds the
            # record already written.
            log.warning("session lease %x (ttl %ss) lost: %s", self.lease_id, self.ttl, reason)
        self.lost.set()
        self._stop.set()

    def close(self) -> None:
        """Stop the keepalive thread and revoke the lease. Idempotent."""
        if os.getpid() != self._pid:
            # A forked child: the lease and its thread are the parent's, and
            # so may be the lock, if another thread held it at the fork.
            self._closed = True
            _open_sessions.discard(self)
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _open_sessions.discard(self)
        self._stop.set()
        if self._thread is not threading.current_thread():
            # A refresh in flight ends within the refresh interval; the wait
            # is bounded all the same, so that close never hangs on gRPC.
            self._thread.join(max(self.ttl / 3, 0.5) + CLEANUP_TIMEOUT)
        was_lost = self.lost.is_set()
        self.lost.set()
        if was_lost or self._transport.closed:
            return
        try:
            self._transport.lease_revoke(self.lease_id, deadline=Deadline(CLEANUP_TIMEOUT))
        except EtcdPatternsError as exc:
            log.debug(
                "could not revoke lease %x; it expires in %ss: %s", self.lease_id, self.ttl, exc
            )

    def abandon(self, orphan: Orphan) -> None:
        """Have the keepalive thread delete a key later."""
        with self._lock:
            self._abandoned.append(orphan)

    def withdraw(self, orphan: Orphan) -> bool:
        """Delete a key now, on the caller's thread; abandon it if that fails.

        Takes at most `CLEANUP_TIMEOUT` (or the transport's timeout, if
        shorter). It never waits for the keepalive thread: a key withdrawn
        here is deleted here, whatever the janitor is doing.

        Returns:
            Whether etcd confirmed that the key is gone (or was not this
            incarnation). False if it was handed to the keepalive thread.
        """
        request = self._delete_request(orphan)
        try:
            self._transport.txn(request, write=False, deadline=Deadline(CLEANUP_TIMEOUT))
        except EtcdPatternsError as exc:
            log.debug("key %r not withdrawn yet, left to the keepalive thread: %s", orphan.key, exc)
            self.abandon(orphan)
            return False
        except BaseException:
            self.abandon(orphan)  # a second Ctrl-C: let it through
            raise
        return True

    def _delete_request(self, orphan: Orphan) -> Any:
        if orphan.create_revision is not None:
            return ops.delete_if_created(orphan.key, orphan.create_revision)
        compare = [ops.compare_lease(orphan.key, "==", self.lease_id)]
        if orphan.value is not None:
            compare.append(ops.compare_value(orphan.key, "==", orphan.value))
        return ops.txn(compare=compare, success=[ops.delete(orphan.key)], failure=[])

    def delete_abandoned(self) -> None:
        """Try once to delete every abandoned key; keep those etcd did not confirm.

        Runs on the keepalive thread. Spends at most a third of the TTL, so
        that a backlog never delays the next keepalive long enough to lose
        the lease.
        """
        budget = Deadline(self.ttl / 3)
        with self._lock:
            pending, self._abandoned = self._abandoned, []
        try:
            while pending and not budget.expired():
                request = self._delete_request(pending[-1])
                try:
                    self._transport.txn(request, write=False, deadline=budget)
                except EtcdPatternsError as exc:
                    log.debug("abandoned key %r not deleted yet: %s", pending[-1].key, exc)
                    break
                pending.pop()
        finally:
            with self._lock:
                self._abandoned.extend(pending)

    def borrow_slot(self) -> Slot:
        """Take a bookkeeping key for one operation; `return_slot` gives it back."""
        with self._lock:
            if self._slots:
                return self._slots.pop()
            self._slot_count += 1
            name = f"{self.lease_id:x}/{self._slot_count}"
        return Slot(self._keyspace.internal("slots", name))

    def return_slot(self, slot: Slot) -> None:
        """Give back a slot whose ``token`` is known to be what etcd holds."""
        with self._lock:
            self._slots.append(slot)

    def _keep_alive(self) -> None:
        interval = max(self.ttl / 3, 0.5)
        wait = interval
        while not self._stop.wait(wait):
            sent = time.monotonic()
            try:
                # A hung endpoint must not hold up the next try for long.
                ttl = self._transport.lease_keepalive(self.lease_id, deadline=Deadline(interval))
            except EtcdUnavailableError as exc:
                log.debug("keepalive of lease %x failed, retrying: %s", self.lease_id, exc)
                wait = min(0.5, interval)
                continue
            except ClosedError:
                return
            except Exception as exc:  # a daemon thread must not die noisily
                self.mark_lost(f"keepalive failed: {exc!r}")
                return
            if ttl <= 0:
                self.mark_lost("etcd reports it expired or revoked")
                return
            self.confirmed_until = sent + ttl
            wait = interval
            if self._abandoned:
                self.delete_abandoned()


class Sessions:
    """Creates sessions lazily, one per TTL, and replaces lost ones.

    Args:
        transport: Sends the lease requests.
        keyspace: Names the sessions' bookkeeping keys.
        default_ttl: The TTL of the instance's own session.
    """

    def __init__(self, transport: Transport, keyspace: Keyspace, default_ttl: int) -> None:
        self._transport = transport
        self._keyspace = keyspace
        self.default_ttl = default_ttl
        self._sessions: dict[int, Session] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()

    def get(self, ttl: int | None = None) -> Session:
        """The live session for ``ttl`` (default: the instance's), created if needed."""
        ttl = self.default_ttl if ttl is None else ttl
        with self._lock:
            if self._closed:
                raise ClosedError("this EtcdPatterns instance is closed")
            session = self._sessions.get(ttl)
            if session is not None and not session.lost.is_set():
                return session
            # Granting under the lock keeps concurrent callers from each
            # creating a session; they wait for this one instead.
            fresh = self._sessions[ttl] = Session(self._transport, self._keyspace, ttl)
        if session is not None:
            session.close()
        return fresh

    def abandon(self, ttl: int | None, orphan: Orphan) -> None:
        """Hand a key, written under the session for ``ttl``, to that session to delete.

        Never creates a session: if that one is gone, so is its lease, and
        with it the key.
        """
        session = self._current(ttl)
        if session is not None:
            session.abandon(orphan)

    def withdraw(self, ttl: int | None, orphan: Orphan) -> None:
        """Have the session for ``ttl`` delete a key now; see `Session.withdraw`.

        Never creates a session, for the same reason as `abandon`.
        """
        session = self._current(ttl)
        if session is not None:
            session.withdraw(orphan)

    def _current(self, ttl: int | None) -> Session | None:
        with self._lock:
            session = self._sessions.get(self.default_ttl if ttl is None else ttl)
        return None if session is None or session.lost.is_set() else session

    def close(self) -> None:
        """Close every session. Idempotent."""
        if os.getpid() != self._pid:
            # A forked child may have inherited the lock held (a grant in
            # another thread at the fork); the sessions are the parent's.
            self._closed = True
            return
        with self._lock:
            self._closed = True
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.close()
