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

A write that creates a key of its own (a name no other write uses, that
only its creator deletes, on the session lease) writes nothing to its slot:
the key is the evidence, and the slot only a fence. The write still
requires the slot to hold ``last_token``, and resolution is::

    if exists(key) then get(key)                            # it was applied
    else if value(slot) == last_token then put(slot, fence_token)  # now it never can be

A key that went with its lease leaves the outcome unknown, as a slot that
went with it does: the fence, on the same lease, cannot be written then, and
no copy of the write can apply under the dead lease anyway.

Lease loss: a transaction that puts the slot, or creates its own key, under
an expired lease fails as
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
one put to the caller's transaction; for a write that creates a key of its
own, one compare and no write. Resolution costs one more round trip.

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
from typing import Any, Protocol

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
        session: The session whose lease carried the write's evidence.
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
    creates: bytes | None = None,
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
        creates: A key that ``success`` creates on the session's lease, with
            a name that no other write uses and that only its creator
            deletes. Its existence is then the evidence of the outcome, and
            the slot is compared but not written (see `_Created`). Not for
            a key that others delete (a queue item, a barrier waiter) or
            whose name is reused (a member id): a write applied, then
            deleted, would be taken for one never applied.

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
        evidence: _Evidence = _Slotted(current) if creates is None else _Created(current, creates)
        # Whether the evidence is as the round left it, so that its slot
        # may serve again; a slot left uncertain is dropped, never reused.
        known = True
        try:
            request = evidence.request(compare, operations, failure)
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
                applied_at = _resolve(transport, current, evidence, exc, deadline=budget)
                known = True
                if applied_at is not None:
                    return Committed(True, applied_at, None, current)
                continue
            except EtcdPatternsError:
                raise  # the transport proved that nothing was applied
            except BaseException as interruption:
                known = False  # until settled: a second Ctrl-C may cut the settling short
                known = _settle_interrupted(transport, current, evidence, interruption)
                raise
            outcome = evidence.answered(response)
            if outcome is not None:
                succeeded, responses = outcome
                return Committed(succeeded, response.header.revision, responses, current)
        finally:
            evidence.done(known=known)
    where = ",".join(transport.endpoints)
    raise EtcdUnavailableError(
        f"etcd at {where} lost the answers to every attempt at one write within "
        f"{transport.timeout}s; none applied"
    )


class _Evidence(Protocol):
    """How one round of `commit` proves its outcome, and settles it if the answer is lost."""

    def request(
        self, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any]
    ) -> Any:
        """The round's transaction: the caller's, with the evidence's own operations."""

    def answered(self, response: Any) -> tuple[bool, Sequence[Any]] | None:
        """Whether the caller's compares held, and the responses to its operations.

        None if the answer proves nothing of the caller's compares, and
        nothing was applied: the round is then made again.
        """

    def resolution(self) -> Any:
        """A transaction that, once answered, shuts out any copy of the request not yet applied.

        It is idempotent: it can be sent again. A copy of it that etcd
        receives late never makes a write apply twice; at worst it fences
        the slot anew, and the slot's next user resynchronises.
        """

    def resolved(self, response: Any) -> int | None:
        """The revision the request applied at, from the resolution's answer; None if it never can.

        Raises:
            OutcomeUnknownError: The evidence is gone (with the lease).
        """

    def done(self, *, known: bool) -> None:
        """The round is over; ``known`` says whether its evidence is as the round left it."""


class _Slotted:
    """Evidence in a slot: the request compares the slot's last token and writes a new one."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._pool = _pool(session)
        self._slot = self._pool.borrow()
        self._token = _token()

    def request(
        self, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any]
    ) -> Any:
        slot = self._slot
        put = ops.put(slot.key, self._token, lease=self._session.lease_id)
        return _guarded(slot, compare, [*success, put], failure)

    def answered(self, response: Any) -> tuple[bool, Sequence[Any]] | None:
        slot = self._slot
        if response.succeeded:
            slot.token = self._token.decode("ascii")
            return True, response.responses[:-1]
        return _failure_branch(slot, response)

    def resolution(self) -> Any:
        """``if slot == token then get(slot) else (if slot == last then put(slot, fence))``.

        ``slot.token`` still holds the value the request required the slot
        to have. The fence is itself guarded by that value, so that a copy
        of this transaction delivered late, after the slot has moved on,
        changes nothing.
        """
        self._fence = _token()
        return _resolution(
            self._session,
            self._slot,
            self._fence,
            applied=ops.compare_value(self._slot.key, "==", self._token),
            evidence=ops.get(self._slot.key),
        )

    def resolved(self, response: Any) -> int | None:
        slot = self._slot
        if response.succeeded:
            slot.token = self._token.decode("ascii")
            revision: int = ops.kvs(response.responses, 0)[0].mod_revision
            return revision
        _fence_seen(self._session, slot, self._fence, response)
        return None

    def done(self, *, known: bool) -> None:
        if known:
            self._pool.give_back(self._slot)


class _Created:
    """Evidence in the key the request creates; a slot only as its fence, compared, never written.

    The request requires the slot to hold its last token, as `_Slotted`
    does, but writes nothing to it: that costs etcd one compare in place of
    a compare and a put. Resolution::

        if exists(key) then get(key)                    # it was applied
        else if slot == last then put(slot, fence)      # now it never can be

    The key's name is the write's alone, and only its creator deletes it,
    so its existence proves that the write applied, and its absence that it
    did not, or that the key went with the session lease, in which case the
    fence cannot be written either: then no copy of the write can apply, but
    whether it did is unknown. A slot that served an answered request keeps
    its token: the one copy of the request has been spent.
    """

    def __init__(self, session: Session, key: bytes) -> None:
        self._session = session
        self._key = key
        self._pool = _pool(session)
        self._slot = self._pool.borrow()

    def request(
        self, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any]
    ) -> Any:
        return _guarded(self._slot, compare, success, failure)

    def answered(self, response: Any) -> tuple[bool, Sequence[Any]] | None:
        if response.succeeded:
            return True, response.responses
        return _failure_branch(self._slot, response)

    def resolution(self) -> Any:
        self._fence = _token()
        return _resolution(
            self._session,
            self._slot,
            self._fence,
            applied=ops.compare_version(self._key, ">", 0),
            evidence=ops.get(self._key, keys_only=True),
        )

    def resolved(self, response: Any) -> int | None:
        if response.succeeded:
            revision: int = ops.kvs(response.responses, 0)[0].create_revision
            return revision
        _fence_seen(self._session, self._slot, self._fence, response)
        return None

    def done(self, *, known: bool) -> None:
        if known:
            self._pool.give_back(self._slot)


def _guarded(
    slot: Slot, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any]
) -> Any:
    """The caller's transaction, requiring the slot to hold its last token; read on failure."""
    return ops.txn(
        compare=[*compare, _slot_holds(slot)],
        success=list(success),
        failure=[*failure, ops.get(slot.key)],
    )


def _failure_branch(slot: Slot, response: Any) -> tuple[bool, Sequence[Any]] | None:
    """A request's failure branch: the caller's responses, or None if the slot had moved on.

    The branch ends with a read of the slot.
    """
    found = ops.kvs(response.responses, -1)
    observed = found[0].value.decode("ascii") if found else None
    if observed == slot.token:
        return False, response.responses[:-1]
    # The slot is not as this session left it; most likely its lease
    # expired. Resynchronise and try again: a put under a dead lease then
    # fails as a whole, and the session is replaced.
    slot.token = observed
    return None


def _resolution(session: Session, slot: Slot, fence: bytes, *, applied: Any, evidence: Any) -> Any:
    """``if applied then evidence else (if the slot holds its last token then put(slot, fence))``.

    The fence is guarded by the slot's last token, the value the request
    required, so that a copy of the resolution delivered late, after the
    slot has moved on, changes nothing.
    """
    return ops.txn(
        compare=[applied],
        success=[evidence],
        failure=[
            ops.nested(
                compare=[_slot_holds(slot)],
                success=[ops.put(slot.key, fence, lease=session.lease_id)],
                failure=[ops.get(slot.key)],
            )
        ],
    )


def _fence_seen(session: Session, slot: Slot, fence: bytes, response: Any) -> None:
    """Record the slot's token after a resolution that found the write unapplied: fenced now.

    Raises:
        OutcomeUnknownError: The slot is gone, with the session lease.
    """
    inner = response.responses[0].response_txn
    if inner.succeeded:
        slot.token = fence.decode("ascii")
        return
    found = ops.kvs(inner.responses, 0)
    if not found:
        # The slot is gone, so its lease is: whether the write applied
        # before that is evidence lost with it.
        session.mark_lost("its bookkeeping key is gone")
        raise OutcomeUnknownError("the session lease that could tell is gone")
    # The slot holds neither the write's token nor the value the write
    # required: an earlier fence already shut the write out.
    slot.token = found[0].value.decode("ascii")


def _settle_interrupted(
    transport: Transport, session: Session, evidence: _Evidence, interruption: BaseException
) -> bool:
    """Shut out a write whose sender was interrupted, if it has not applied.

    Returns:
        Whether it was settled. If etcd does not answer in time, the
        interruption goes on regardless.
    """
    cause = OutcomeUnknownError(f"the write was interrupted by {interruption!r}")
    try:
        _resolve(transport, session, evidence, cause, deadline=Deadline(CLEANUP_TIMEOUT))
    except OutcomeUnknownError:
        return False
    return True


def _resolve(
    transport: Transport,
    session: Session,
    evidence: _Evidence,
    cause: OutcomeUnknownError,
    *,
    deadline: Deadline | None = None,
) -> int | None:
    """Decide a write whose answer was lost; the revision it applied at, or None."""
    request = evidence.resolution()
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
    try:
        return evidence.resolved(response)
    except OutcomeUnknownError as exc:
        raise OutcomeUnknownError(f"{cause}; {exc}") from None
