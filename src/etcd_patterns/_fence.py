"""Fences: what every holder of something in etcd proves its holding with.

A holder (a lock's holder, a claimed queue item, and every later primitive
that hands something out) won its place by creating a key on its session
lease. The key and its create revision, the *fencing token*, are the proof:
while that key exists with that create revision, the holder still holds;
once it is gone (released, or deleted by etcd with an expired lease), no
key can ever have that create revision again.

Guarantees:

* A write guarded by a fence (``transform(..., guard=fence)``) carries the
  compare ``create_revision(key) == fencing_token`` in its own transaction,
  so it applies only while the holder still holds, at the write's revision.
  When the fence has fallen, the write raises the holder's lost error
  (`LockLostError`, `ClaimLostError`) and writes nothing.
* Fencing tokens increase: a later holder of the same thing always has a
  larger token, so a storage system that remembers the largest token it
  has seen can reject a stale holder's writes.

Cost: a guard adds one compare (and, on failure, one keys-only read) to the
guarded transaction; `Fence.is_owner` is one round trip.

Lease loss: when the holder's session lease is lost, etcd deletes the key,
so the fence falls by itself; `Fence.lost` is set once etcd tells the
session so. While etcd cannot be reached, nobody can tell: `lost` stays
clear, and `Fence.confirmed_until` says until when the hold was certain.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

from etcd3 import transactions

from . import _ops as ops
from ._errors import EtcdPatternsError, OutcomeUnknownError
from ._session import Orphan, Session
from ._transport import Transport


class Fence:
    """Proof that this process still holds something in etcd.

    `HeldLock` and `ClaimedItem` are fences. Pass one as ``guard=`` to a
    write, or use `guard` in your own transactions.

    Attributes:
        fencing_token: The create revision of the holder's key. It
            increases with every new holder: pass it to a storage system
            that rejects writes carrying an older token.
        lease_id: The session lease that the holder's key carries.
    """

    def __init__(
        self, *, etcd_key: bytes, fencing_token: int, session: Session, transport: Transport
    ) -> None:
        self.etcd_key = etcd_key
        self.fencing_token = fencing_token
        self.lease_id = session.lease_id
        self._session = session
        self._transport = transport

    @property
    def lost(self) -> threading.Event:
        """Set when the session lease that carries the holder's key is lost."""
        return self._session.lost

    @property
    def confirmed_until(self) -> float:
        """The `time.monotonic` instant until which etcd surely holds the holder's lease.

        It moves forward with every refresh that etcd confirms, about every
        third of the TTL. `lost` is set only when etcd says the lease is
        gone; a holder cut off from etcd (or paused) past this instant may
        already have lost its hold without knowing it. Check it before an
        action that no guard or fencing token can protect.
        """
        return self._session.confirmed_until

    def is_owner(self) -> bool:
        """Ask etcd whether the holder's key still exists: one round trip."""
        response = self._transport.range(ops.range_request(self.etcd_key))
        return any(kv.create_revision == self.fencing_token for kv in response.kvs)

    def guard(self) -> Any:
        """An etcd3 compare that holds only while this fence stands.

        Put it into your own python3-etcd3 transactions, so that a write
        applies only if this holder still holds::

            client.transaction(compare=[fence.guard()], success=[...], failure=[])
        """
        return transactions.Create(self.etcd_key) == self.fencing_token

    def _holds(self) -> Any:
        """The guard as an etcdrpc compare, for the library's own transactions."""
        return ops.compare_create(self.etcd_key, "==", self.fencing_token)

    def _lost_error(self, consequence: str) -> EtcdPatternsError:
        """The error a guarded write raises when the fence has fallen."""
        return EtcdPatternsError(f"the holder's key {self.etcd_key!r} is gone; {consequence}")


def give_back(
    transport: Transport, key: bytes, revision: int, session: Session, *, also: Sequence[Any] = ()
) -> bool:
    """Delete a holder's key, if it is still this holder's (its create revision).

    ``also`` are operations applied in the same transaction, only if the
    key was still the holder's.

    Returns:
        False if the key was already gone: the holder had lost its hold.
        True otherwise, including when etcd could not be reached, in which
        case the session deletes the key as soon as etcd answers again.
    """
    request = ops.txn(
        compare=[ops.compare_create(key, "==", revision)],
        success=[ops.delete(key), *also],
        failure=[],
    )
    try:
        try:
            return bool(transport.txn(request).succeeded)
        except OutcomeUnknownError:
            # A second copy can only delete this holder's key; but if the
            # first copy did delete it, the second finds it gone. The key
            # vanishes without us only with its lease, so a live lease
            # means the first copy did.
            if transport.txn(request, write=False).succeeded:
                return True
            return transport.lease_time_to_live(session.lease_id) > 0
    except EtcdPatternsError:
        session.abandon(Orphan(key, revision))
        return True
    except BaseException:
        session.abandon(Orphan(key, revision))  # Ctrl-C: still let go
        raise


F = TypeVar("F", bound=Fence)


class Holding(Generic[F]):
    """A ``with`` block that holds a fence: taken on entry, given back on exit.

    Leaving raises the fence's lost error if it had been lost meanwhile,
    unless the block is already raising.

    Args:
        take: Takes the fence (waits for a lock, campaigns, ...); it may
            raise, and then nothing is held.
        give_back: Gives it back; False if it had been lost.
        lost: What the lost error says of the loss.
    """

    def __init__(self, take: Callable[[], F], give_back: Callable[[F], bool], *, lost: str) -> None:
        self._take = take
        self._give_back = give_back
        self._lost = lost
        self._held: F | None = None

    def __enter__(self) -> F:
        self._held = self._take()
        return self._held

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        held, self._held = self._held, None
        if held is not None and not self._give_back(held) and exc_type is None:
            raise held._lost_error(self._lost)


@functools.cache
def _host() -> str:
    return socket.gethostname()


def holder_info() -> bytes:
    """What a holder's key says of it: host, process and thread, for whoever looks."""
    thread = threading.current_thread().name
    return f"{_host()} pid={os.getpid()} thread={thread}".encode()


class ThreadHolds:
    """Which thread holds which name, so that no thread waits behind itself.

    Threads are told apart by their thread objects, not their idents: the
    platform reuses an ident once its thread ends, and a new thread must not
    inherit a dead one's holds.
    """

    def __init__(self) -> None:
        self._held: dict[tuple[threading.Thread, bytes], Fence] = {}
        self._lock = threading.Lock()

    def holds(self, raw: bytes) -> bool:
        """Whether the calling thread holds ``raw``."""
        with self._lock:
            return (threading.current_thread(), raw) in self._held

    def add(self, raw: bytes, fence: Fence, thread: threading.Thread) -> None:
        """Record that ``thread`` holds ``raw`` through ``fence``."""
        with self._lock:
            self._held[(thread, raw)] = fence

    def discard(self, raw: bytes, fence: Fence, thread: threading.Thread) -> None:
        """Forget ``fence``, if it is still the one recorded."""
        with self._lock:
            if self._held.get((thread, raw)) is fence:
                del self._held[(thread, raw)]
