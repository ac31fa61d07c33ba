"""Contender queues: the protocol that locks, elections and semaphores share.

Protocol, etcd's own (Go's ``concurrency.Mutex`` and ``concurrency.Election``,
and so ``etcdctl lock`` and ``etcdctl elect``), so that each excludes the
others; a semaphore is the same queue with more than one place:

* A contender for ``name`` writes a key directly under ``name/``, carrying
  its session lease, and in the same round trip reads the newest keys
  created before its own, as many as there are places.
* The oldest keys under ``name/`` (by create revision) win, one per place:
  the lock's holder, the election's leader, a semaphore's holders.
* A contender that has as many keys ahead of it as there are places
  watches those keys, and only them, until one is deleted: while they all
  exist it cannot win. Then it re-reads, in one round trip, its own key and
  the keys now ahead of it. It wins only from a read that saw its own key.
  With one place (a lock, an election) it watches just its predecessor: no
  herd. With more, a deletion wakes at most as many waiters as there are
  places.
* The registration's read also counts the keys ahead. With more than twice
  as many as there are places, none of the keys watched can go before at
  least three releases, so none is likely to go before the watch exists:
  the wait loop's ``replay`` watches them from the registration's revision
  as well, in place of a read when etcd moved on before the watch began.
  Should one go all the same (three quick handoffs, or a waiter ahead that
  gave up), the wake-up waits for etcd's history replay, up to 100 ms.
* Leaving deletes the contender's key, guarded by its create revision:
  never anyone else's, even after its lease expired and another won.
* A contender that gives up (timeout, exception, Ctrl-C) deletes its key;
  when etcd cannot be reached, its session deletes it once etcd answers.
* What the name itself must be is the pattern's `Entry`: by default, not a
  key that holds a value; for a semaphore, the key that records its limit.

Guarantees:

* While the session leases live, at most as many contenders win as there
  are places, and waiters win in the order they registered (FIFO).
* A winner's fencing token, the create revision of its key, is unique to
  it; with one place, it increases with every new winner.
* A registration is written through the exactly-once commit, so a copy of
  it that etcd receives late never creates a key that nobody owns. Its
  evidence is the contender key itself, whose name is the attempt's alone:
  the registration writes no bookkeeping key. One
  whose outcome stays unknown because its lease is gone (its answer lost,
  then its lease) is made again on a fresh session: nothing of it can be
  left. One whose settling failed (etcd away) raises `OutcomeUnknownError`,
  and its session deletes the key, if any, once etcd answers.
* A key under ``name/`` without a lease is data, which no contender would
  ever delete: a contender that finds one ahead of its own raises the
  pattern's misuse error rather than wait for ever.

Cost: winning uncontended is one round trip, and leaving is one. Each key
ahead that leaves costs the waiters it wakes one watch and one read; a
waiter near the front pays one more read when etcd moved on between its
registration and its watch.

Lease loss: etcd deletes the contender's key with its lease. A waiter whose
key vanished registers again, on a fresh session, at the back of the queue;
a winner learns of the loss from its session's ``lost`` event and from its
fence, which has fallen.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from . import _ops as ops
from ._commit import commit
from ._errors import EtcdPatternsError, OutcomeUnknownError
from ._fence import give_back
from ._keys import Keyspace, children_range
from ._retry import Deadline
from ._session import Orphan, Session, Sessions
from ._transport import Transport
from ._wait import Watch, wait

_DELETE = kv_pb2.Event.DELETE
# A waiter watches each key ahead of it, up to this many; beyond, the whole
# directory, whose deletions it filters.
_WATCHES_PER_WAITER = 8


class Contender(NamedTuple):
    """A key queued under a lock, semaphore or election name, as `EtcdPatterns.contenders` lists it.

    Attributes:
        key: The key, without the namespace.
        value: Its value: who holds or waits (host, pid and thread, for the
            library's locks and semaphores), or an election candidate's
            proposal. Bytes that are not UTF-8 show as backslash escapes.
        lease_id: The session lease the key carries; 0 for none (data).
        fencing_token: Its create revision: the order of the queue.
    """

    key: str
    value: str
    lease_id: int
    fencing_token: int


def list_contenders(transport: Transport, keyspace: Keyspace, raw: bytes) -> list[Contender]:
    """Every key under ``raw/``, oldest first: one round trip.

    A read-write lock's keys are a level deeper, under ``raw/read/`` and
    ``raw/write/``.
    """
    start, end = children_range(raw)
    response = transport.range(ops.range_request(start, end, oldest_first=True))
    return [
        Contender(
            key=keyspace.decode(kv.key),
            value=kv.value.decode("utf-8", "backslashreplace"),
            lease_id=kv.lease,
            fencing_token=kv.create_revision,
        )
        for kv in response.kvs
    ]


class _Refused(Exception):
    """A registration whose entry compares failed; nothing was written."""

    def __init__(self, responses: Sequence[Any]) -> None:
        super().__init__("refused")
        self.responses = responses


class Won(NamedTuple):
    """A contender key that won.

    Attributes:
        key: The key, with the namespace.
        revision: Its create revision: the fencing token.
        session: The session whose lease the key carries.
    """

    key: bytes
    revision: int
    session: Session


class Attempt(NamedTuple):
    """The outcome of `Contenders.try_win`.

    Attributes:
        revision: The etcd revision of the attempt.
        won: The winning key; None if another contender was there first.
    """

    revision: int
    won: Won | None


class Winner(NamedTuple):
    """The winning key, from one read.

    Attributes:
        kv: The winning key, with its value and create revision; None if
            there is no contender.
        revision: The revision the read reflects.
    """

    kv: Any | None
    revision: int


class Line(NamedTuple):
    """Where a contender's key goes, and which keys it queues behind.

    Attributes:
        keys: The directory its key is written in (with the namespace).
        ahead: The range ``(start, end)`` of the keys it waits behind,
            those created before its own.
        in_order: Whether the keys in that range win in the order they
            were created, as many at a time as there are places: then a key
            with as many keys ahead of it as there are places has not won.
    """

    keys: bytes
    ahead: tuple[bytes, bytes]
    in_order: bool = True


class Entry(NamedTuple):
    """What a pattern requires of its name for a contender to register.

    Attributes:
        compare: Compares that the registration's transaction must pass.
        success: Operations it applies with the registration, before it.
        failure: Reads it makes when the compares fail.
        refused: Called with those reads' responses: it raises the
            pattern's error, or returns the entry to register with next.
    """

    compare: Sequence[Any]
    success: Sequence[Any]
    failure: Sequence[Any]
    refused: Callable[[Sequence[Any]], Entry]


class _Turn(NamedTuple):
    """Where a contender stands, from one read.

    Attributes:
        exists: Whether my key is still there.
        ahead: The newest keys created before mine, newest first (keys
            only), at most as many as there are places: fewer means that,
            if my key exists, I have won one.
        revision: The revision the read reflects.
        distant: Whether the keys in ``ahead`` are far from winning: more
            than twice as many keys as there are places were ahead, so that
            none of them can leave before at least three releases.
    """

    exists: bool
    ahead: Sequence[Any]
    revision: int
    distant: bool = False


class _Registration(NamedTuple):
    """A contender key written by `Contenders._register`.

    Attributes:
        revision: The key's create revision.
        session: The session whose lease the key carries.
        turn: Where the key stood when it was written.
    """

    revision: int
    session: Session
    turn: _Turn


class Contenders:
    """Contender queues of one pattern, over one transport and set of sessions.

    Args:
        transport: Sends requests.
        keyspace: Maps names to etcd keys.
        sessions: Provides the session lease for each TTL.
        noun: What the pattern calls a name ("lock", "election"), for errors.
        misuse: The pattern's error for a name that holds data.
    """

    def __init__(
        self,
        transport: Transport,
        keyspace: Keyspace,
        sessions: Sessions,
        *,
        noun: str,
        misuse: Callable[[str], EtcdPatternsError],
    ) -> None:
        self._transport = transport
        self._keyspace = keyspace
        self._sessions = sessions
        self._noun = noun
        self._misuse = misuse
        self._sequence = itertools.count(1)
        self._instance = secrets.token_hex(8)

    def contend(
        self,
        raw: bytes,
        value: bytes,
        *,
        lease_ttl: int | None,
        deadline: Deadline,
        timeout_error: Callable[[], Exception],
        places: int = 1,
        entry: Entry | None = None,
        line: Line | None = None,
    ) -> Won:
        """Register under ``raw/`` and wait until this contender wins a place.

        Args:
            raw: The name, with the namespace.
            value: The contender key's value.
            lease_ttl: The session's TTL; None for the default.
            deadline: When to give up; the key is withdrawn then, as on any
                other error.
            timeout_error: Makes the error raised when the deadline passes.
            places: How many contenders win at once: the oldest ``places``.
            entry: What the name must be; by default, not a key that holds
                a value.
            line: Where the key goes and what it waits behind; by default,
                directly under ``raw/``, behind every key there.
        """
        rule = entry or self._no_value_at(raw)
        queue = line or Line(raw, children_range(raw))
        # The sessions handed to the registration's commit, latest last.
        carriers: list[Session] = []

        def carrier() -> Session:
            session = self._sessions.get(lease_ttl)
            carriers.append(session)
            return session

        while True:
            my_key = self._contender_key(queue.keys)
            carriers.clear()
            try:
                registered = self._register(
                    my_key, value, carrier, places=places, entry=rule, line=queue
                )
            except _Refused as refused:
                rule = rule.refused(refused.responses)  # or raises
                if deadline.expired():
                    raise timeout_error() from None
                continue
            except OutcomeUnknownError as exc:
                self.withdraw_unsettled(lease_ttl, my_key, exc)
                if not (carriers and carriers[-1].lost.is_set()):
                    raise  # etcd away: it may be there, until the session deletes it
                # The lease went, and the evidence with it: my key, if it
                # was ever written, went too, and no late copy can write it
                # on a lease that is gone. Register afresh, at the back.
                if deadline.expired():
                    raise timeout_error() from exc
                continue
            except BaseException as exc:
                self.withdraw_unsettled(lease_ttl, my_key, exc)
                raise
            revision, session = registered.revision, registered.session
            try:
                if self._wait_turn(
                    raw,
                    my_key,
                    revision,
                    session,
                    places=places,
                    line=queue,
                    turn=registered.turn,
                    deadline=deadline,
                    timeout_error=timeout_error,
                ):
                    return Won(my_key, revision, session)
            except BaseException:
                session.withdraw(Orphan(my_key, revision))
                raise
            # My key vanished: the session was lost. Queue again on a fresh
            # one, unless time is up; like any new contender, at the back.
            # Should the old lease live after all, its key must not stay
            # ahead of the new one.
            session.abandon(Orphan(my_key, revision))
            if deadline.expired():
                raise timeout_error()

    def try_win(self, raw: bytes, value: bytes, *, lease_ttl: int | None) -> Attempt:
        """Register only if there is no contender at all: one round trip."""
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
                success=lambda session: [ops.put(my_key, value, lease=session.lease_id)],
                failure=[
                    ops.get(raw, keys_only=True),
                    ops.get(start, end, oldest_first=True, limit=1, keys_only=True),
                ],
                creates=my_key,
            )
        except BaseException as exc:
            self.withdraw_unsettled(lease_ttl, my_key, exc)
            raise
        if committed.succeeded:
            return Attempt(committed.revision, Won(my_key, committed.revision, committed.session))
        assert committed.responses is not None  # failures always carry responses
        if ops.kvs(committed.responses, 0):
            raise self._name_holds_data(raw)
        (winner,) = ops.kvs(committed.responses, 1) or [None]
        if winner is not None and not winner.lease:
            raise self._data_under_name(raw, winner.key)
        return Attempt(committed.revision, None)

    def winner(self, raw: bytes) -> Winner:
        """The winning key, if any, with its value: one round trip."""
        start, end = children_range(raw)
        response = self._transport.range(ops.range_request(start, end, oldest_first=True, limit=1))
        (first,) = response.kvs or [None]
        if first is not None and not first.lease:
            raise self._data_under_name(raw, first.key)
        return Winner(first, response.header.revision)

    def leave(
        self, key: bytes, revision: int, session: Session, *, also: Sequence[Any] = ()
    ) -> bool:
        """Delete a contender's key, if it is still this contender's.

        ``also`` are operations applied in the same transaction, only if the
        key was still this contender's.

        Returns:
            False if the key was already gone: the contender had lost its
            place. True otherwise, including when etcd could not be reached,
            in which case the session deletes the key as soon as etcd
            answers again.
        """
        return give_back(self._transport, key, revision, session, also=also)

    def withdraw_unsettled(self, lease_ttl: int | None, my_key: bytes, exc: BaseException) -> None:
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

    # -- the queue ----------------------------------------------------------

    def _register(
        self,
        my_key: bytes,
        value: bytes,
        session: Callable[[], Session],
        *,
        places: int,
        entry: Entry,
        line: Line,
    ) -> _Registration:
        """Write my key and read the keys ahead of it in one round trip.

        The write goes through the exactly-once commit: a copy of it that
        etcd receives late can never create my key a second time (after I
        left, say), which would leave a contender that nobody owns. My key's
        name is this attempt's alone, so the commit writes no slot: my key's
        existence says whether the write applied, and the slot serves only
        as a fence.

        Raises:
            _Refused: The entry's compares failed; nothing was written.
        """
        start, end = line.ahead
        committed = commit(
            self._transport,
            session,
            compare=list(entry.compare),
            # The range runs before the put, so it sees the newest keys
            # created before mine.
            success=lambda session: [
                ops.get(start, end, newest_first=True, limit=places, keys_only=True),
                *entry.success,
                ops.put(my_key, value, lease=session.lease_id),
            ],
            failure=list(entry.failure),
            creates=my_key,
        )
        if not committed.succeeded:
            assert committed.responses is not None  # failures always carry responses
            raise _Refused(committed.responses)
        revision = committed.revision
        if committed.responses is None:
            # Settled after a lost answer: read what the answer would have
            # said, and whether my key is still there to say it of.
            turn = self._check_turn(my_key, revision, places, line)
        else:
            # The range's count is of every key ahead, whatever its limit.
            before = committed.responses[0].response_range.count
            turn = _Turn(
                exists=True,
                ahead=ops.kvs(committed.responses, 0),
                revision=revision,
                distant=line.in_order and before > 2 * places,
            )
        return _Registration(revision, committed.session, turn)

    def _check_turn(self, my_key: bytes, revision: int, places: int, line: Line) -> _Turn:
        """Whether my key exists, and the keys now ahead of it, in one round trip."""
        start, end = line.ahead
        request = ops.txn(
            compare=[],
            success=[
                ops.get(my_key, keys_only=True),
                ops.get(
                    start,
                    end,
                    newest_first=True,
                    limit=places,
                    keys_only=True,
                    max_create_revision=revision - 1,
                ),
            ],
            failure=[],
        )
        response = self._transport.txn(request, write=False)
        return _Turn(
            exists=bool(ops.kvs(response.responses, 0)),
            ahead=ops.kvs(response.responses, 1),
            revision=response.header.revision,
        )

    def _wait_turn(
        self,
        raw: bytes,
        my_key: bytes,
        revision: int,
        session: Session,
        *,
        places: int,
        line: Line,
        turn: _Turn,
        deadline: Deadline,
        timeout_error: Callable[[], Exception],
    ) -> bool:
        """Wait until I win a place (True), or my key or session is gone (False).

        True is only ever reported from a read that saw my key.
        """

        def watch(turn: _Turn) -> Watch | None:
            if not turn.exists or len(turn.ahead) < places or session.lost.is_set():
                return None
            for kv in turn.ahead:
                if not kv.lease:
                    raise self._data_under_name(raw, kv.key)
            # Only the keys just ahead: all of them still there means that
            # as many keys as there are places are ahead, so I can win only
            # once one of them goes. No herd: a key's deletion wakes at most
            # the ``places`` contenders right behind it.
            ahead = {kv.key for kv in turn.ahead}
            if len(ahead) <= _WATCHES_PER_WAITER:
                keys = [(key, b"") for key in sorted(ahead)]
            else:
                # Many places: one watch on the directory, filtered here.
                keys = [line.ahead]
            creates = [
                etcdrpc.WatchCreateRequest(
                    key=key, range_end=range_end, filters=[etcdrpc.WatchCreateRequest.NOPUT]
                )
                for key, range_end in keys
            ]
            # Keys far from winning are unlikely to leave before my watch
            # exists: watch them from my read's revision as well, rather
            # than read again when etcd moved on meanwhile.
            return Watch(
                creates,
                lambda event: event.type == _DELETE and event.kv.key in ahead,
                replay=turn.distant,
            )

        final = wait(
            self._transport,
            turn,
            read=lambda: self._check_turn(my_key, revision, places, line),
            watch=watch,
            deadline=deadline,
            timeout_error=timeout_error,
        )
        return final.exists and len(final.ahead) < places

    def _no_value_at(self, raw: bytes) -> Entry:
        """The default entry: the name is not a key that holds a value."""

        def refused(responses: Sequence[Any]) -> Entry:
            raise self._name_holds_data(raw)

        return Entry(
            compare=[ops.compare_version(raw, "==", 0)],
            success=[],
            failure=[ops.get(raw, keys_only=True)],
            refused=refused,
        )

    # -- helpers ------------------------------------------------------------

    def _contender_key(self, directory: bytes) -> bytes:
        # Unique to this instance and attempt, and known before the session
        # that will carry it, so that an unsettled attempt can be withdrawn.
        return directory + f"/{self._instance}-{next(self._sequence)}".encode()

    def _data_under_name(self, raw: bytes, key: bytes) -> EtcdPatternsError:
        noun = self._noun
        return self._misuse(
            f"key {self._keyspace.decode(key)!r} under {noun} {self._keyspace.decode(raw)!r} "
            f"carries no lease, so it is data, not a contender, and would win the {noun} "
            f"for ever; store data outside the {noun}'s directory"
        )

    def _name_holds_data(self, raw: bytes) -> EtcdPatternsError:
        noun = self._noun
        return self._misuse(
            f"{noun} name {self._keyspace.decode(raw)!r} is a key that holds a value; "
            f"a {noun} needs a name of its own"
        )
