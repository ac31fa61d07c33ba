"""Double barriers: ``count`` participants enter together and leave together, round after round.

Protocol, for the double barrier ``name``:

* A participant enters by writing a key under ``name/waiters/``, carrying
  its session lease, with the value ``entered``; the same round trip reads
  how many keys were written before its own. It does so only while
  ``name/ready`` does not exist: while it does, a round is under way, and a
  newcomer waits for it to end. A participant with ``count`` keys before its
  own is one too many: it withdraws, with `BarrierFullError`.
* Once ``count`` keys exist, any of their participants writes
  ``name/ready``, guarded by the existence of those ``count`` keys, with the
  create revision of the last of them as its value: the round begins, its
  create revision names it, and its members are the keys up to that one.
  Entering returns once ``name/ready`` exists; a participant whose key came
  after the round's last is one too many (`BarrierFullError`).
* A participant leaves by setting its key's value to ``left``. Once every
  key of the round says ``left``, one transaction, guarded by exactly that
  and by the round's ``name/ready``, deletes ``name/ready`` and every key:
  the round is over, for all of them at once, and the next one may begin.
  Leaving returns once the round's ``name/ready`` is gone.
* A key that vanishes while its round is under way, before the round ended,
  is a participant that died (its lease expired) or gave up: the others'
  waits end with `BarrierBrokenError`, and each withdraws its own key; the
  last to go deletes ``name/ready``. A participant whose leaving fails (a
  timeout, etcd away) withdraws its key too, breaking the round rather than
  blocking the name. A ``name/ready`` with no keys left beside it, from a
  round whose participants all died, is deleted by the next participant to
  enter, and a whole round whose keys all say ``left`` is ended by it.

Guarantees:

* Nobody leaves round k before all ``count`` participants entered it, and
  nobody enters round k+1 before all of round k have left.
* Reusable: the same name runs round after round.
* No wait is for ever: a participant that dies is noticed within its lease's
  TTL; every wait is also bounded by its ``timeout`` (`BarrierTimeoutError`).
* A block that raises breaks the round: its participant withdraws its key,
  and the others' waits end with `BarrierBrokenError`.

Cost: entering is one round trip to register, one more for the participant
that writes ``name/ready``, then one watch and one read per change until the
round begins; leaving is the same, with the round's end in place of its
beginning. Every participant watches the directory: a barrier wakes them
all by its nature.

Lease loss: a participant whose own key vanished gets `BarrierBrokenError`;
the others get it too, as for any participant that died.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, NamedTuple

from etcd3 import etcdrpc

from . import _ops as ops
from ._commit import commit
from ._errors import (
    BarrierBrokenError,
    BarrierFullError,
    BarrierTimeoutError,
    EtcdPatternsError,
)
from ._keys import Keyspace, prefix_end
from ._retry import Deadline, check_count, check_timeout
from ._session import Orphan, Session, Sessions, check_ttl
from ._transport import Transport
from ._wait import Watch, wait

ENTERED, LEFT = b"entered", b"left"


class BarrierRound(NamedTuple):
    """A participant's place in one round of a double barrier.

    Attributes:
        name: The double barrier's name, without the namespace.
        participants: How many participants a round has.
        key: This participant's key, without the namespace.
        round: The round's number: the create revision of ``name/ready``.
    """

    name: str
    participants: int
    key: str
    round: int


class _Seen(NamedTuple):
    """A double barrier, from one read.

    Attributes:
        ready: ``name/ready``, or None; its value is the create revision of
            the round's last participant key.
        waiters: The keys under ``name/waiters/``, oldest first.
        revision: The revision the read reflects.
    """

    ready: Any | None
    waiters: Sequence[Any]
    revision: int


class _Place(NamedTuple):
    """What entering leaves behind, for leaving."""

    raw: bytes
    key: bytes
    revision: int
    session: Session
    participants: int
    round: int


class DoubleBarriers:
    """The double barrier pattern over one transport, namespace and set of sessions.

    Args:
        transport: Sends requests.
        keyspace: Maps names to etcd keys.
        sessions: Provides the session lease for each TTL.
    """

    def __init__(self, transport: Transport, keyspace: Keyspace, sessions: Sessions) -> None:
        self._transport = transport
        self._keyspace = keyspace
        self._sessions = sessions
        self._sequence = itertools.count(1)
        self._instance = secrets.token_hex(8)

    # -- entering -----------------------------------------------------------

    def enter(self, raw: bytes, count: int, lease_ttl: int | None, deadline: Deadline) -> _Place:
        """Register, then wait until ``count`` participants have."""
        while True:
            seen = self._read(raw)
            if seen.ready is not None:
                if not seen.waiters:
                    self._clear_stale_round(raw, seen.ready)
                elif self._finished(seen, count):
                    self._end_round(raw, seen.ready.create_revision, seen.waiters)
                else:
                    self._wait(
                        raw,
                        seen,
                        lambda s: s.ready is None or not s.waiters or self._finished(s, count),
                        deadline,
                        "a round to end",
                    )
                continue
            my_key = raw + f"/waiters/{self._instance}-{next(self._sequence)}".encode()
            try:
                place = self._register(raw, my_key, count, lease_ttl)
            except _RoundUnderWay:
                continue
            except BaseException:
                self._sessions.withdraw(lease_ttl, Orphan(my_key))
                raise
            try:
                return self._await_round(raw, place, deadline)
            except BaseException:
                self._withdraw(raw, place)
                raise

    def _register(self, raw: bytes, my_key: bytes, count: int, lease_ttl: int | None) -> _Place:
        """Write my key while no round is under way.

        Raises:
            _RoundUnderWay: A round is under way; nothing was written.
            BarrierFullError: ``count`` keys were ahead of mine; mine is
                withdrawn.
        """
        start, end = _waiters(raw)
        committed = commit(
            self._transport,
            lambda: self._sessions.get(lease_ttl),
            compare=[ops.compare_version(_ready(raw), "==", 0)],
            success=lambda session: [
                ops.get(start, end, oldest_first=True, limit=count, keys_only=True),
                ops.put(my_key, ENTERED, lease=session.lease_id),
            ],
            failure=[],
        )
        if not committed.succeeded:
            raise _RoundUnderWay
        place = _Place(raw, my_key, committed.revision, committed.session, count, 0)
        # Settled after a lost answer, the keys ahead are not known: whether
        # this participant made the round is then decided by name/ready.
        before = len(ops.kvs(committed.responses, 0)) if committed.responses is not None else 0
        if before >= count:
            self._withdraw(raw, place)
            raise self._full(raw, count)
        return place

    def _await_round(self, raw: bytes, place: _Place, deadline: Deadline) -> _Place:
        """Wait until the round begins; write ``name/ready`` when its last participant is in."""
        while True:
            seen = self._wait(
                raw,
                self._read(raw),
                lambda s: s.ready is not None or self._complete(s, place.participants),
                deadline,
                f"{place.participants} participants to enter",
            )
            mine = [kv for kv in seen.waiters if kv.create_revision == place.revision]
            if not mine:
                raise self._broken(raw, "this participant's own session was lost")
            if seen.ready is not None:
                if place.revision > _last_member(seen.ready):
                    # The round began with the keys up to the one its
                    # name/ready names, and mine came after them.
                    raise self._full(raw, place.participants)
                return place._replace(round=seen.ready.create_revision)
            first = seen.waiters[: place.participants]
            if all(kv.create_revision != place.revision for kv in first):
                raise self._full(raw, place.participants)
            # The round is complete: begin it, while its keys all exist. Its
            # name/ready names the last of them: later keys are not in it.
            # Guarded so, a second or late copy changes nothing.
            self._transport.txn(
                ops.txn(
                    compare=[
                        ops.compare_version(_ready(raw), "==", 0),
                        *(ops.compare_create(kv.key, "==", kv.create_revision) for kv in first),
                    ],
                    success=[ops.put(_ready(raw), str(first[-1].create_revision).encode())],
                    failure=[],
                ),
                write=False,
            )

    # -- leaving ------------------------------------------------------------

    def leave(self, place: _Place, deadline: Deadline) -> None:
        """Say I left, then wait until every participant of the round has.

        If leaving fails (etcd away, a timeout), the participant withdraws
        its key: the round breaks for the others, rather than block the name.
        """
        try:
            self._leave(place, deadline)
        except BaseException:
            self._withdraw(place.raw, place)
            raise

    def _leave(self, place: _Place, deadline: Deadline) -> None:
        raw = place.raw
        # Guarded by my key's create revision: a second or late copy changes
        # nothing.
        marked = self._transport.txn(
            ops.txn(
                compare=[ops.compare_create(place.key, "==", place.revision)],
                success=[ops.put(place.key, LEFT, lease=place.session.lease_id)],
                failure=[],
            ),
            write=False,
        )
        if not marked.succeeded:
            raise self._broken(raw, "this participant's own session was lost")
        while True:
            seen = self._wait(
                raw,
                self._read(raw),
                lambda s: (
                    self._over(s, place) or len(s.waiters) < place.participants or self._all_left(s)
                ),
                deadline,
                "every participant to leave",
            )
            if self._over(seen, place):
                return
            if len(seen.waiters) < place.participants:
                raise self._broken(raw, "a participant vanished before it left")
            self._end_round(raw, place.round, seen.waiters)

    def _end_round(self, raw: bytes, round_: int, members: Sequence[Any]) -> None:
        """Every participant has left: end the round, for all at once.

        Guarded by the round's name/ready, by every key saying left, and by
        each of ``members`` still being there: a member that vanished since
        it was read breaks the round instead. A second or late copy changes
        nothing.
        """
        start, end = _waiters(raw)
        self._transport.txn(
            ops.txn(
                compare=[
                    ops.compare_create(_ready(raw), "==", round_),
                    ops.compare_value(start, "==", LEFT, range_end=end),
                    *(ops.compare_create(kv.key, "==", kv.create_revision) for kv in members),
                ],
                success=[ops.delete(_ready(raw)), ops.delete(start, end)],
                failure=[],
            ),
            write=False,
        )

    def abandon(self, place: _Place) -> None:
        """Leave without waiting, breaking the round for the others."""
        self._withdraw(place.raw, place)

    # -- helpers ------------------------------------------------------------

    def _wait(
        self,
        raw: bytes,
        seen: _Seen,
        done: Callable[[_Seen], bool],
        deadline: Deadline,
        what: str,
    ) -> _Seen:
        start, end = _waiters(raw)

        def watch(state: _Seen) -> Watch | None:
            if done(state):
                return None
            creates = [
                etcdrpc.WatchCreateRequest(key=_ready(raw)),
                etcdrpc.WatchCreateRequest(key=start, range_end=end),
            ]
            return Watch(creates, lambda event: True)

        return wait(
            self._transport,
            seen,
            read=lambda: self._read(raw),
            watch=watch,
            deadline=deadline,
            timeout_error=lambda: BarrierTimeoutError(
                f"double barrier {self._keyspace.decode(raw)!r}: still waiting for {what}"
            ),
        )

    def _read(self, raw: bytes) -> _Seen:
        start, end = _waiters(raw)
        response = self._transport.txn(
            ops.txn(
                compare=[],
                success=[
                    ops.get(_ready(raw)),
                    ops.get(start, end, oldest_first=True),
                ],
                failure=[],
            ),
            write=False,
        )
        (ready,) = ops.kvs(response.responses, 0) or [None]
        return _Seen(ready, ops.kvs(response.responses, 1), response.header.revision)

    @staticmethod
    def _complete(seen: _Seen, count: int) -> bool:
        return len(seen.waiters) >= count

    @staticmethod
    def _over(seen: _Seen, place: _Place) -> bool:
        """Whether the participant's round has ended."""
        return seen.ready is None or seen.ready.create_revision != place.round

    @staticmethod
    def _all_left(seen: _Seen) -> bool:
        return all(kv.value == LEFT for kv in seen.waiters)

    @classmethod
    def _finished(cls, seen: _Seen, count: int) -> bool:
        """Whether a round under way is whole, and every one of it has left."""
        return len(seen.waiters) >= count and cls._all_left(seen)

    def _withdraw(self, raw: bytes, place: _Place) -> None:
        """Delete my key; the last key to go takes ``name/ready`` with it."""
        start, end = _waiters(raw)
        request = ops.txn(
            compare=[ops.compare_create(place.key, "==", place.revision)],
            success=[
                ops.delete(place.key),
                ops.nested(
                    compare=[ops.compare_create(start, "==", place.revision, range_end=end)],
                    success=[ops.delete(_ready(raw))],
                    failure=[],
                ),
            ],
            failure=[],
        )
        try:
            self._transport.txn(request)
        except EtcdPatternsError:
            place.session.abandon(Orphan(place.key, place.revision))

    def _clear_stale_round(self, raw: bytes, ready: Any) -> None:
        """Delete a ``name/ready`` whose participants are all gone."""
        start, end = _waiters(raw)
        self._transport.txn(
            ops.txn(
                compare=[
                    ops.compare_create(_ready(raw), "==", ready.create_revision),
                    ops.compare_create(start, "==", 0, range_end=end),
                ],
                success=[ops.delete(_ready(raw))],
                failure=[],
            )
        )

    def _full(self, raw: bytes, count: int) -> BarrierFullError:
        return BarrierFullError(
            f"double barrier {self._keyspace.decode(raw)!r} already has its {count} participants"
        )

    def _broken(self, raw: bytes, why: str) -> BarrierBrokenError:
        return BarrierBrokenError(f"double barrier {self._keyspace.decode(raw)!r} broke: {why}")


class _RoundUnderWay(Exception):
    """A registration refused because a round is under way; nothing was written."""


def _last_member(ready: Any) -> int:
    """The create revision of a round's last member, as its name/ready says; 0 if unreadable."""
    text = ready.value.decode("ascii", "replace")
    return int(text) if text.isdecimal() else 0


def _ready(raw: bytes) -> bytes:
    return raw + b"/ready"


def _waiters(raw: bytes) -> tuple[bytes, bytes]:
    start = raw + b"/waiters/"
    return start, prefix_end(start)


class DoubleBarriered:
    """Context manager of `EtcdPatterns.double_barrier`: enters on entry, leaves on exit."""

    def __init__(
        self,
        barriers: DoubleBarriers,
        keyspace: Keyspace,
        *,
        name: object,
        count: object,
        ttl: object,
        timeout: object,
    ) -> None:
        self._raw = keyspace.encode(name, name="double barrier name", trailing_slash=True)
        self._count = check_count(count, name="count")
        self._lease_ttl = None if ttl is None else check_ttl(ttl)
        self._timeout = check_timeout(timeout)
        self._barriers = barriers
        self._keyspace = keyspace
        self._place: _Place | None = None

    def __enter__(self) -> BarrierRound:
        place = self._barriers.enter(
            self._raw, self._count, self._lease_ttl, Deadline(self._timeout)
        )
        self._place = place
        return BarrierRound(
            name=self._keyspace.decode(self._raw),
            participants=self._count,
            key=self._keyspace.decode(place.key),
            round=place.round,
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        place, self._place = self._place, None
        if place is None:
            return
        if exc_type is not None:
            self._barriers.abandon(place)  # the others learn the round broke
            return
        self._barriers.leave(place, Deadline(self._timeout))
