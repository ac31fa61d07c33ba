"""Exactly-once conditional writes, even when etcd's answer is lost.

When a write's response is lost (a dropped connection, a deadline, a leader
change), etcd may or may not have applied it, and may still apply it later.
Sending it again blindly can apply it twice; assuming it failed can lose it.
`commit` settles the question with a *slot*: a bookkeeping key on the
session lease, owned by one operation at a time.

Protocol, for a caller's transaction ``if C then S else F``::

    if C and value(slot) == last_token then S; put(slot, new_token)
    else F; get(slot)

If the answer is lost, one resolving transaction decides the outcome for
good::

    if value(slot) == new_token then get(slot)      # it was applied
    else put(slot, fence_token)                     # now it never can be

The resolving transaction is idempotent, so it is simply retried. Once it
answers, the original transaction either was applied (its revision is the
slot's mod revision) or can never be, since it requires the slot to still
hold ``last_token``; it is then safe to send again.

Lease loss: a transaction that puts the slot under an expired lease fails as
a whole, so nothing is applied, and `commit` retries on a fresh session.
So `commit` needs no local check that its session still lives before it
reports success: a success proves that etcd held the lease at the write's
revision, whatever the session's `lost` flag said. If
the lease was lost while the outcome was unknown, the slot's evidence is gone
with it, and `OutcomeUnknownError` is raised: the one case this protocol
cannot decide. So it is when etcd refuses the resolving transaction (the
instance was closed meanwhile, or the role lost its permission): the write
may have applied, so the refusal becomes the cause of an
`OutcomeUnknownError`, never an error that would say nothing was done.

Interruption: if the caller's thread is interrupted while the write is in
flight (Ctrl-C, or another exception raised by a signal handler), the write
is settled the same way before the interruption goes on: one resolving
transaction, bounded by the session's `CLEANUP_TIMEOUT`. Once it answers, a
copy of the write that etcd receives late can never apply, so the caller
can withdraw what the write may have created, by name, for good.

Settling that fails (etcd away): the resolving transaction goes to the
session's janitor, which sends it before it deletes any key, so that what
the caller withdraws or abandons cannot be created again by a late copy.

Cost: no extra round trip on the normal path. The slot adds one compare and
one put to the caller's transaction. Resolution costs one more round trip.

Time: one deadline, the transport's timeout, bounds the whole call: every
attempt, every resolution and every round. A write whose answer is lost
late in that time has little left to settle in, and then raises
`OutcomeUnknownError` rather than overrun.
"""

from __future__ import annotations

import secrets
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import _ops as ops
from ._errors import (
    EtcdPatternsError,
    EtcdUnavailableError,
    LeaseNotFoundError,
    OutcomeUnknownError,
)
from ._retry import Deadline
from ._session import CLEANUP_TIMEOUT, Session
from ._transport import Transport


@dataclass(frozen=True)
class Committed:
    """The outcome of `commit`.

    Attributes:
        succeeded: Whether the caller's compares held and its success
            operations were applied (exactly once).
        revision: The revision at which the transaction took effect.
        responses: The responses to the caller's own operations, in order.
            None when success was established after a lost answer, in which
            case the success branch's responses are unknown.
        session: The session whose slot recorded the outcome.
    """

    succeeded: bool
    revision: int
    responses: Sequence[Any] | None
    session: Session


@dataclass
class Slot:
    """A bookkeeping key, on a session lease, owned by one operation at a time.

    Attributes:
        key: The etcd key, under the session's ``scratch_prefix``.
        token: The value this session last wrote to it; None if it has
            never been written (or vanished with its lease).
    """

    key: bytes
    token: str | None = None


class _SlotPool:
    """The slots of one session that no operation owns right now.

    A slot goes back to the pool only when its token is known to be what
    etcd holds: after an answer, or after a resolution. One whose state is
    uncertain (an interrupted settling) is dropped, and stays in etcd until
    its lease ends; an error that proves nothing was sent returns it.
    """

    def __init__(self, prefix: bytes) -> None:
        self._prefix = prefix
        self._free: list[Slot] = []
        self._count = 0
        self._lock = threading.Lock()

    def borrow(self) -> Slot:
        with self._lock:
            if self._free:
                return self._free.pop()
            self._count += 1
            return Slot(self._prefix + str(self._count).encode())

    def give_back(self, slot: Slot) -> None:
        with self._lock:
            self._free.append(slot)


_pools: weakref.WeakKeyDictionary[Session, _SlotPool] = weakref.WeakKeyDictionary()
_pools_lock = threading.Lock()


def _pool(session: Session) -> _SlotPool:
    with _pools_lock:
        pool = _pools.get(session)
        if pool is None:
            pool = _pools[session] = _SlotPool(session.scratch_prefix)
        return pool


# A round is not started with less time than this left: it could hardly
# finish, and an attempt cut short by its deadline is an unknown outcome.
_MIN_ROUND = 0.05


def _token() -> bytes:
    return secrets.token_hex(8).encode("ascii")


def _slot_holds(slot: Slot) -> Any:
    if slot.token is None:
        return ops.compare_version(slot.key, "==", 0)
    return ops.compare_value(slot.key, "==", slot.token.encode("ascii"))


def commit(
    transport: Transport,
    session: Callable[[], Session],
    *,
    compare: Sequence[Any],
    success: Sequence[Any] | Callable[[Session], Sequence[Any]],
    failure: Sequence[Any],
) -> Committed:
    """Apply ``if compare then success else failure`` exactly once.

    Args:
        transport: Sends the transactions.
        session: Returns a live session; called again if the lease is lost.
        compare: The caller's compares.
        success: Operations applied if every compare holds; or a function
            that builds them for the session in use, so that they can carry
            its lease (a lost lease is then replaced along with the slot's).
        failure: Operations applied otherwise; typically ranges that show
            why the compares failed.

    Returns:
        The outcome; on failure, ``responses`` holds the failure branch's.

    Raises:
        EtcdUnavailableError: etcd was unreachable and nothing was applied.
        OutcomeUnknownError: The outcome could not be determined because the
            session lease was lost as well.
        LeaseNotFoundError: A lease that the caller's operations attach had
            expired; nothing was applied.
    """
    # Every round but the last ends with a definite answer from etcd (a
    # fence, a lost lease, a resynchronised slot): nothing of it applied.
    # The deadline only ends answers that keep getting lost.
    budget = Deadline(transport.timeout)
    first = True
    while first or (budget.remaining() or 0.0) >= _MIN_ROUND:
        first = False
        current = session()
        operations = success(current) if callable(success) else success
        pool = _pool(current)
        slot = pool.borrow()
        # Whether slot.token is what etcd holds, so that the next operation
        # may use the slot; a slot left uncertain is dropped, never reused.
        known = True
        try:
            token = _token()
            request = ops.txn(
                compare=[*compare, _slot_holds(slot)],
                success=[*operations, ops.put(slot.key, token, lease=current.lease_id)],
                failure=[*failure, ops.get(slot.key)],
            )
            try:
                response = transport.txn(request, deadline=budget)
            except LeaseNotFoundError as exc:
                # Nothing was applied. Whose lease was it? The caller's
                # operations may carry a lease of their own.
                if transport.lease_time_to_live(current.lease_id, deadline=budget) > 0:
                    raise LeaseNotFoundError(
                        "a lease that the write attaches to a key has expired; nothing was written"
                    ) from exc
                current.mark_lost("etcd no longer knows it")
                continue
            except OutcomeUnknownError as exc:
                known = False
                applied_at = _resolve(transport, current, slot, token, exc, deadline=budget)
                known = True
                if applied_at is not None:
                    return Committed(True, applied_at, None, current)
                continue
            except EtcdPatternsError:
                raise  # the transport proved that nothing was applied
            except BaseException as interruption:
                known = False  # until settled: a second Ctrl-C may cut the settling short
                known = _settle_interrupted(transport, current, slot, token, interruption)
                raise
            if response.succeeded:
                slot.token = token.decode("ascii")
                return Committed(True, response.header.revision, response.responses[:-1], current)
            found = ops.kvs(response.responses, -1)
            observed = found[0].value.decode("ascii") if found else None
            if observed == slot.token:
                return Committed(False, response.header.revision, response.responses[:-1], current)
            # The slot is not as this session left it; most likely its lease
            # expired. Resynchronise and try again: a put under a dead lease
            # then fails as a whole, and the session is replaced.
            slot.token = observed
        finally:
            if known:
                pool.give_back(slot)
    where = ",".join(transport.endpoints)
    raise EtcdUnavailableError(
        f"etcd at {where} lost the answers to every attempt at one write within "
        f"{transport.timeout}s; none applied"
    )


def _settle_interrupted(
    transport: Transport, session: Session, slot: Slot, token: bytes, interruption: BaseException
) -> bool:
    """Shut out a write whose sender was interrupted, if it has not applied.

    Returns:
        Whether it was settled. If etcd does not answer in time, the
        interruption goes on regardless.
    """
    cause = OutcomeUnknownError(f"the write was interrupted by {interruption!r}")
    try:
        _resolve(transport, session, slot, token, cause, deadline=Deadline(CLEANUP_TIMEOUT))
    except OutcomeUnknownError:
        return False
    return True


def _resolve(
    transport: Transport,
    session: Session,
    slot: Slot,
    token: bytes,
    cause: OutcomeUnknownError,
    *,
    deadline: Deadline | None = None,
) -> int | None:
    """Decide a write whose answer was lost; the revision it applied at, or None.

    ``slot.token`` still holds the value the write required the slot to have.
    The fence is itself guarded by that value, so that a copy of this
    transaction delivered late, after the slot has moved on, changes nothing.
    """
    fence = _token()
    request = ops.txn(
        compare=[ops.compare_value(slot.key, "==", token)],
        success=[ops.get(slot.key)],
        failure=[
            ops.nested(
                compare=[_slot_holds(slot)],
                success=[ops.put(slot.key, fence, lease=session.lease_id)],
                failure=[ops.get(slot.key)],
            )
        ],
    )
    try:
        response = transport.txn(request, write=False, deadline=deadline)
    except LeaseNotFoundError as exc:
        session.mark_lost("etcd no longer knows it")
        raise OutcomeUnknownError(f"{cause}; the session lease that could tell is gone") from exc
    except BaseException as exc:
        # etcd may still receive the write, late: have the session shut it
        # out before it deletes anything the caller gives up on.
        session.settle_later(request)
        if not isinstance(exc, Exception):
            raise
        raise OutcomeUnknownError(f"{cause}; and settling it failed: {exc}") from exc
    if response.succeeded:
        slot.token = token.decode("ascii")
        revision: int = ops.kvs(response.responses, 0)[0].mod_revision
        return revision
    inner = response.responses[0].response_txn
    if inner.succeeded:
        slot.token = fence.decode("ascii")
        return None
    found = ops.kvs(inner.responses, 0)
    if not found:
        # The slot is gone, so its lease is: whether the write applied
        # before that is evidence lost with it.
        session.mark_lost("its bookkeeping key is gone")
        raise OutcomeUnknownError(f"{cause}; the session lease that could tell is gone")
    # The slot holds neither the write's token nor the value the write
    # required: an earlier fence already shut the write out.
    slot.token = found[0].value.decode("ascii")
    return None
