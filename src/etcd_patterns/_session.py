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

Keys a pattern is done with are deleted by the session's `Janitor`
(`_janitor`): at once on the caller's thread, or, if etcd is away, by the
keepalive thread once etcd answers again.

Sessions for TTLs other than the instance's own are retired once idle: when
nobody has asked for one for `IDLE_RETIREMENT` seconds (or twice the
instance's timeout, if longer) and its lease carries no key but its own
scratch keys, its thread stops and its lease is revoked.
A lease grant never holds up callers that want another TTL's session, and
concurrent callers that want the same one share one grant.

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
import copy
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from ._errors import (
    ClosedError,
    EtcdPatternsError,
    EtcdUnavailableError,
    InvalidArgumentError,
    InvalidTypeError,
    forked,
)
from ._janitor import Janitor, Orphan
from ._keys import Keyspace
from ._retry import Deadline
from ._transport import CLEANUP_TIMEOUT, Transport

log = logging.getLogger("etcd_patterns")

# How long a session for a TTL other than the instance's own may go unasked
# for before it is retired, if its lease carries none of the patterns' keys.
IDLE_RETIREMENT = 60.0

__all__ = ["CLEANUP_TIMEOUT", "IDLE_RETIREMENT", "Orphan", "Session", "Sessions", "check_ttl"]


def check_ttl(ttl: object, *, name: str = "ttl") -> int:
    """Validate a lease TTL: a finite number of seconds > 0, rounded up."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise InvalidTypeError(f"{name} must be a number of seconds, not {ttl!r}")
    if not math.isfinite(ttl) or ttl <= 0:
        raise InvalidArgumentError(f"{name} must be a finite number > 0, not {ttl!r}")
    return math.ceil(ttl)


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
        keyspace: Names the session's scratch keys.
        ttl: The requested lease TTL in seconds. etcd may grant more.
        retire: Called by the keepalive thread once the session is idle
            (see `IDLE_RETIREMENT`); if it returns True, the session closes
            itself. None: never retire.
    """

    def __init__(
        self,
        transport: Transport,
        keyspace: Keyspace,
        ttl: int,
        *,
        retire: Callable[[Session, float], bool] | None = None,
    ) -> None:
        self._transport = transport
        started = time.monotonic()
        response = transport.lease_grant(ttl)
        self.lease_id: int = response.ID
        self.ttl: int = response.TTL
        self.scratch_prefix: bytes = keyspace.internal("slots", f"{self.lease_id:x}") + b"/"
        """Keys under this prefix, on this lease, are the session's own
        bookkeeping (the exactly-once commit's slots): they do not keep an
        idle session from being retired."""
        self.lost = threading.Event()
        self._marked_lost = False
        self.confirmed_until: float = started + self.ttl
        """The `time.monotonic` instant until which etcd surely holds the lease."""
        self.last_used: float = started
        """The `time.monotonic` instant a caller last asked `Sessions` for it."""
        self._retire = retire
        self._idle_checked = started
        self._janitor = Janitor(transport, self.lease_id)
        self._stop = threading.Event()
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
        """Have the keepalive thread delete a key later; see `Janitor.abandon`."""
        self._janitor.abandon(orphan)

    def withdraw(self, orphan: Orphan) -> bool:
        """Delete a key now, or have the keepalive thread do it; see `Janitor.withdraw`."""
        return self._janitor.withdraw(orphan)

    def settle_later(self, resolution: Any) -> None:
        """Shut out a write in doubt before any key is deleted; see `Janitor.settle_first`."""
        self._janitor.settle_first(resolution)

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
            if self._janitor.pending:
                # Within a third of the TTL, so that a backlog never delays
                # the next keepalive long enough to lose the lease.
                self._janitor.sweep(Deadline(self.ttl / 3))
            elif self._retire is not None:
                checked = time.monotonic()
                if self._idle(interval) and self._retire(self, checked):
                    self.close()
                    return

    def _idle_after(self) -> float:
        # Longer than any one call may take: a write that got the session
        # just before it went idle has landed, or failed, by then.
        return max(IDLE_RETIREMENT, 2 * self._transport.timeout)

    def _idle(self, interval: float) -> bool:
        """Whether nobody asked for the session lately and its lease carries no pattern's key.

        Asks etcd at most once per `IDLE_RETIREMENT`, and only then.
        """
        now = time.monotonic()
        idle = self._idle_after()
        if now - self.last_used < idle or now - self._idle_checked < idle:
            return False
        self._idle_checked = now
        try:
            keys = self._transport.lease_keys(self.lease_id, deadline=Deadline(interval))
        except EtcdPatternsError as exc:
            log.debug("could not list the keys of lease %x: %s", self.lease_id, exc)
            return False
        return keys is not None and all(key.startswith(self.scratch_prefix) for key in keys)


class _Grant:
    """A lease grant in progress, that concurrent callers for its TTL wait on."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.session: Session | None = None
        self.error: BaseException | None = None


class Sessions:
    """Creates sessions lazily, one per TTL, replaces lost ones and retires idle ones.

    Args:
        transport: Sends the lease requests.
        keyspace: Names the sessions' scratch keys.
        default_ttl: The TTL of the instance's own session, which is never
            retired.
    """

    def __init__(self, transport: Transport, keyspace: Keyspace, default_ttl: int) -> None:
        self._transport = transport
        self._keyspace = keyspace
        self.default_ttl = default_ttl
        self._sessions: dict[int, Session] = {}
        self._grants: dict[int, _Grant] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()

    def get(self, ttl: int | None = None) -> Session:
        """The live session for ``ttl`` (default: the instance's), created if needed.

        The grant runs outside the lock that guards every TTL's session, so
        a slow grant holds up only the callers that wait for the same TTL;
        they share its outcome rather than each granting a lease.

        Raises:
            ClosedError: The instance is closed.
            EtcdUnavailableError, PermissionDeniedError: The grant failed.
        """
        ttl = self.default_ttl if ttl is None else ttl
        if os.getpid() != self._pid:
            raise forked(self._pid)
        with self._lock:
            if self._closed:
                raise ClosedError("this EtcdPatterns instance is closed")
            session = self._sessions.get(ttl)
            if session is not None and not session.lost.is_set():
                session.last_used = time.monotonic()
                return session
            grant = self._grants.get(ttl)
            granting = grant is None
            if grant is None:
                grant = self._grants[ttl] = _Grant()
        if not granting:
            return self._await(grant)
        fresh = self._grant(ttl, grant)
        if session is not None:
            session.close()
        return fresh

    def _grant(self, ttl: int, grant: _Grant) -> Session:
        """Grant a session for ``ttl``, install it, and tell those waiting on ``grant``."""
        fresh: Session | None = None
        installed = False
        try:
            retire = None if ttl == self.default_ttl else self._retire
            fresh = Session(self._transport, self._keyspace, ttl, retire=retire)
            with self._lock:
                installed = not self._closed_meanwhile()
                if installed:
                    self._sessions[ttl] = fresh
            if installed:
                grant.session = fresh
            else:
                grant.error = ClosedError("this EtcdPatterns instance is closed")
        except BaseException as exc:
            grant.error = exc
            raise
        finally:
            # Whatever happened, no caller may wait on this grant for ever.
            with self._lock:
                if self._grants.get(ttl) is grant:
                    del self._grants[ttl]
            grant.done.set()
            if fresh is not None and not installed:
                fresh.close()
        if fresh is None or not installed:
            raise ClosedError("this EtcdPatterns instance is closed")
        return fresh

    def _closed_meanwhile(self) -> bool:
        # A method, so that the check made before the grant is not assumed
        # to still hold after it.
        return self._closed

    def _await(self, grant: _Grant) -> Session:
        # A grant takes at most the transport's timeout (then it fails).
        if not grant.done.wait(self._transport.timeout + CLEANUP_TIMEOUT):
            raise EtcdUnavailableError("a lease grant for this TTL did not finish in time")
        if grant.session is not None:
            return grant.session
        error = grant.error
        if isinstance(error, EtcdPatternsError):
            # A copy: the same exception object must not unwind two threads,
            # nor share its notes with another.
            shared = copy.copy(error)
            shared.__notes__ = list(getattr(error, "__notes__", []))
            raise shared from error
        raise EtcdUnavailableError(
            f"the lease grant for this TTL was interrupted ({error!r}); nothing was held"
        ) from error

    def _retire(self, session: Session, since: float) -> bool:
        """Forget an idle session, unless someone asked for it since ``since``."""
        with self._lock:
            if self._sessions.get(session.ttl) is not session or session.last_used >= since:
                return False
            del self._sessions[session.ttl]
        log.debug("retiring idle session lease %x (ttl %ss)", session.lease_id, session.ttl)
        return True

    def abandon(self, ttl: int | None, orphan: Orphan) -> None:
        """Hand a key, written under the session for ``ttl``, to that session to delete.

        Never creates a session: if that one is gone, so is its lease, and
        with it the key.
        """
        session = self._current(ttl)
        if session is not None:
            session.abandon(orphan)

    def withdraw(self, ttl: int | None, orphan: Orphan) -> bool:
        """Have the session for ``ttl`` delete a key now; see `Session.withdraw`.

        Never creates a session, for the same reason as `abandon`.

        Returns:
            Whether etcd confirmed that the key is gone; True if there is no
            session, whose lease could carry it.
        """
        session = self._current(ttl)
        return True if session is None else session.withdraw(orphan)

    def abandoned(self, ttl: int | None, key: bytes) -> bool:
        """Whether the session for ``ttl`` still has to delete a key of this name."""
        session = self._current(ttl)
        return session is not None and session._janitor.abandoned(key)

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
