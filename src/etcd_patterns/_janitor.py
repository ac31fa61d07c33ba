"""Deleting keys a pattern is done with, now or as soon as etcd answers.

A waiter that gives up, a claim released or let go, a lock released while
etcd is away: each leaves a key, on a session lease, that must go. Left
alone it would stay for as long as the process lives, since the session's
keepalive keeps its lease, and it would hold up others (a contender ahead
of every later waiter, a claimed item that nobody can see).

Protocol:

* `Janitor.withdraw` deletes a key at once, on the caller's thread, in one
  round trip bounded by `CLEANUP_TIMEOUT`.
* A key that could not be deleted (etcd away, or the delete interrupted) is
  kept in a backlog by `Janitor.abandon`; the session's keepalive thread
  runs `Janitor.sweep` after each refresh, until etcd confirms every delete.
* A write whose outcome could not be settled (see `_commit`) leaves a
  resolving transaction with `Janitor.settle_first`. Until etcd has answered
  every such transaction, no key that such a write may have created is
  deleted: a late copy of the write, which etcd may still receive and
  apply, could otherwise create the key again after its delete, and leave
  it on a live lease with nobody to delete it. Once answered, no copy of
  the write can ever apply. A key deleted by its create revision needs no
  such wait: the write that made it is known to have applied, once.
  Only a lost lease settles a write for good without an answer, since the
  write's own bookkeeping key is gone with it.

Guarantees:

* A delete never removes someone else's key: it requires the key's create
  revision, when known, and otherwise this session's lease, plus the value
  the write made unique to itself, when there is one (see `Orphan`).
* A key withdrawn is gone before `withdraw` returns, whenever etcd answers
  within `CLEANUP_TIMEOUT`; an abandoned one, within a refresh interval of
  etcd answering again, while the process lives.
* A sweep spends at most the budget it is given, so that a backlog never
  delays a keepalive long enough to lose the lease.

Cost: one round trip per key.

Lease loss: keys on a lost lease are gone with it; deleting them again
changes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from . import _ops as ops
from ._errors import EtcdPatternsError, LeaseNotFoundError
from ._retry import Deadline
from ._transport import CLEANUP_TIMEOUT, Transport

log = logging.getLogger("etcd_patterns")


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


class Janitor:
    """Deletes the keys of one session's lease that their patterns are done with.

    Args:
        transport: Sends the deletes.
        lease_id: The session lease that keys of unknown revision carry.
    """

    def __init__(self, transport: Transport, lease_id: int) -> None:
        self._transport = transport
        self._lease_id = lease_id
        self._backlog: list[Orphan] = []
        # What a sweep is deleting right now: abandoned still, until etcd
        # confirms each delete.
        self._sweeping: list[Orphan] = []
        self._unsettled: list[Any] = []
        self._failed_at = float("-inf")
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """How many abandoned keys and unsettled writes are still to be dealt with."""
        with self._lock:
            return len(self._backlog) + len(self._sweeping) + len(self._unsettled)

    def abandoned(self, key: bytes) -> bool:
        """Whether a key abandoned under this name is still to be deleted."""
        with self._lock:
            return any(orphan.key == key for orphan in [*self._backlog, *self._sweeping])

    def settle_first(self, resolution: Any) -> None:
        """Have a write's resolving transaction sent before any key is deleted.

        Args:
            resolution: A `TxnRequest` that is safe to send any number of
                times, and that, once answered, shuts the write out.
        """
        with self._lock:
            self._unsettled.append(resolution)

    def abandon(self, orphan: Orphan) -> None:
        """Have the next sweep delete a key."""
        with self._lock:
            self._backlog.append(orphan)

    def withdraw(self, orphan: Orphan) -> bool:
        """Delete a key now, on the caller's thread; abandon it if that fails.

        Takes at most `CLEANUP_TIMEOUT` (or the transport's timeout, if
        shorter). A key that a write in doubt may have created waits for
        that write's resolution, which is sent first, unless settling just
        failed (etcd is away: the key is then left to the sweep at once).
        It never waits for a sweep: a key withdrawn here is deleted here,
        whatever the backlog holds.

        Returns:
            Whether etcd confirmed that the key is gone (or was not this
            incarnation). False if it was left to the sweep.
        """
        deadline = Deadline(CLEANUP_TIMEOUT)
        try:
            if not self._may_delete(orphan, deadline):
                self.abandon(orphan)
                return False
            self._transport.txn(self._delete_request(orphan), write=False, deadline=deadline)
        except EtcdPatternsError as exc:
            log.debug("key %r not withdrawn yet, left to the keepalive thread: %s", orphan.key, exc)
            self.abandon(orphan)
            return False
        except BaseException:
            self.abandon(orphan)  # a second Ctrl-C: let it through
            raise
        return True

    def sweep(self, budget: Deadline) -> None:
        """Try once to settle every write in doubt, then to delete every abandoned key.

        Keeps what etcd did not confirm, for the next sweep.
        """
        settled = self._settle(budget)
        with self._lock:
            # Checked again with the backlog in hand: another thread may
            # have left a write in doubt meanwhile, and abandoned its key.
            in_doubt = not settled or bool(self._unsettled)
            pending = [o for o in self._backlog if not in_doubt or _certain(o)]
            self._backlog = [o for o in self._backlog if in_doubt and not _certain(o)]
            self._sweeping = pending
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
                self._backlog.extend(pending)
                self._sweeping = []

    def _may_delete(self, orphan: Orphan, deadline: Deadline) -> bool:
        """Whether no write in doubt can create ``orphan`` again after its delete."""
        if _certain(orphan):
            return True
        with self._lock:
            if not self._unsettled:
                return True
            failed_lately = time.monotonic() - self._failed_at < CLEANUP_TIMEOUT
        # Settling that just failed would fail again: do not spend the
        # caller's time twice on an etcd that is away.
        return not failed_lately and self._settle(deadline)

    def _settle(self, budget: Deadline) -> bool:
        """Send the resolutions still pending, oldest first; whether none is left.

        A resolution leaves the list only once etcd has answered it, so that
        no other thread sees the list empty while one is in flight. Sending
        one twice, from two threads, is harmless. Only one refusal is final:
        the lease is gone, and with it the slot, so that no copy of the write
        can apply any more. Any other error keeps the resolution, and every
        key a write in doubt may have created, for the next try.
        """
        while True:
            with self._lock:
                if not self._unsettled:
                    return True
                resolution = self._unsettled[0]
            if budget.expired():
                return False
            try:
                self._transport.txn(resolution, write=False, deadline=budget)
            except LeaseNotFoundError:
                log.debug("a write in doubt can no longer apply: its lease is gone")
            except EtcdPatternsError as exc:
                log.debug("a write in doubt is not settled yet: %s", exc)
                with self._lock:
                    self._failed_at = time.monotonic()
                return False
            with self._lock:
                # By identity: another thread may have settled it first.
                self._unsettled = [r for r in self._unsettled if r is not resolution]

    def _delete_request(self, orphan: Orphan) -> Any:
        if orphan.create_revision is not None:
            return ops.delete_if_created(orphan.key, orphan.create_revision)
        compare = [ops.compare_lease(orphan.key, "==", self._lease_id)]
        if orphan.value is not None:
            compare.append(ops.compare_value(orphan.key, "==", orphan.value))
        return ops.txn(compare=compare, success=[ops.delete(orphan.key)], failure=[])


def _certain(orphan: Orphan) -> bool:
    """Whether the write that created ``orphan`` is known to have applied, once.

    A key deleted by its create revision cannot be created again with that
    revision: no write in doubt stands between it and its delete.
    """
    return orphan.create_revision is not None
