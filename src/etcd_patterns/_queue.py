"""A FIFO queue in which exactly one consumer receives each item.

Layout: the items of queue ``dir_key`` are its direct children
``dir_key/<id>``, where ``<id>`` sorts in enqueue order (a timestamp, then
random digits), so that ``get_values(dir_key)`` lists what is pending.
Consumers take items in create-revision order, etcd's own total order of
writes. Claims of the claim/ack mode live outside the queue's directory,
under ``<namespace>.etcd-patterns/claims/``, on the claimer's session lease.

Guarantees:

* Every enqueued item is delivered exactly once by `dequeue`: taking an item
  is a transaction that deletes it only if it is unchanged and unclaimed,
  sent through the exactly-once commit (`_commit`), so that a lost answer
  neither loses the item nor hands it out twice. `enqueue` is exactly-once
  the same way.
* With several consumers, each takes the oldest item it saw that nobody took
  first. Order across consumers is FIFO as far as "oldest available" goes;
  one consumer receives any one producer's items in that producer's order.
* An item enqueued with a ``ttl`` carries its own lease and vanishes,
  undelivered, once the lease expires.
* A blocked `dequeue` wakes on a watch, within milliseconds of an enqueue
  or of a claim's release. It waits in the shared wait loop (`_wait`), so
  nothing that happens between its read and its watch is missed; if the
  watch breaks, the consumer reads again and watches anew, and it reads
  again at least every `RECHECK_INTERVAL` in any case.
* In claim/ack mode (`claim`), an item stays in place while claimed,
  invisible to other consumers. Ack deletes item and claim in one
  transaction; an exception in the block releases the claim; a consumer that
  dies lets its claim expire with its session lease, after its TTL.

Lease loss: a consumer whose session lease is lost while it holds a claim
loses the claim; its ack raises `ClaimLostError` and removes nothing, since
another consumer may already have the item.

Cost: `enqueue` is one round trip. `dequeue` reads a batch of candidate
heads (one round trip) and then takes one per call (one round trip each);
when another consumer took a candidate first, it moves on to the next one
rather than reading again.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple

from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from . import _ops as ops
from ._commit import commit
from ._errors import (
    ClaimLostError,
    EtcdError,
    EtcdPatternsError,
    InvalidTypeError,
    NotAValueError,
    OutcomeUnknownError,
    QueueEmptyError,
    ValueDecodeError,
)
from ._fence import Fence
from ._keys import (
    Keyspace,
    children_range,
    decode_value,
    encode_value,
    is_direct_child,
    prefix_end,
)
from ._retry import Deadline, check_count, check_timeout
from ._session import Orphan, Session, Sessions, check_ttl
from ._transport import Transport
from ._wait import Watch, wait

# How many candidate heads one read fetches, by default: the amortised cost
# of a dequeue is 1 + 1/PREFETCH round trips.
PREFETCH = 16
# Items per transaction in the batch calls, within etcd's default
# --max-txn-ops of 128 (each item needs up to two compares or one put, and
# the commit's bookkeeping one more).
CHUNK = 60
# How many sets of fresh item keys an enqueue draws before giving up: a
# collision needs another writer to pick the same nanosecond and random tag.
_KEY_TRIES = 3

_PUT = kv_pb2.Event.PUT
_DELETE = kv_pb2.Event.DELETE


@dataclass(frozen=True)
class _Candidate:
    """An item that was there, unclaimed, when last read."""

    key: bytes
    value: str
    mod_revision: int
    claim: bytes


class _Heads(NamedTuple):
    """The oldest unclaimed items of a queue, from one read.

    Attributes:
        candidates: Oldest first.
        revision: The revision the read reflects.
    """

    candidates: list[_Candidate]
    revision: int


class ClaimedItem(Fence):
    """An item held by a claim, inside ``with etcd.claim(dir_key) as item:``. A `Fence`.

    Attributes:
        key: The item's key, without the namespace.
        value: The item's value.
        fencing_token: The create revision of the claim: it increases with
            every claim of the queue, so a store can reject the writes of a
            consumer whose claim has since expired and been replaced.
        lease_id: The session lease that the claim carries.
    """

    def __init__(
        self,
        *,
        key: str,
        value: str,
        fencing_token: int,
        session: Session,
        transport: Transport,
        item_key: bytes,
        claim: bytes,
    ) -> None:
        super().__init__(
            etcd_key=claim, fencing_token=fencing_token, session=session, transport=transport
        )
        self.key = key
        self.value = value
        self._item_key = item_key

    def __repr__(self) -> str:
        return f"<ClaimedItem {self.key!r} fencing_token={self.fencing_token}>"

    def _lost_error(self, consequence: str) -> ClaimLostError:
        return ClaimLostError(f"the claim on {self.key!r} is gone; {consequence}")


class Queue:
    """The queue pattern over one transport, namespace and set of sessions.

    Args:
        transport: Sends requests.
        keyspace: Maps queue names to etcd keys.
        sessions: The sessions that record outcomes and carry claims.
        prefetch: How many candidate heads one read fetches; 1 reads the
            queue before every take.
    """

    def __init__(
        self,
        transport: Transport,
        keyspace: Keyspace,
        sessions: Sessions,
        *,
        prefetch: int = PREFETCH,
    ) -> None:
        self._transport = transport
        self._keyspace = keyspace
        self._sessions = sessions
        self._prefetch = prefetch
        self._candidates: dict[bytes, deque[_Candidate]] = {}
        self._lock = threading.Lock()
        self._last_stamp = 0

    # -- producing ----------------------------------------------------------

    def enqueue(self, dir_key: object, value: object, *, ttl: object = None) -> str:
        """See `EtcdPatterns.enqueue`."""
        return self.enqueue_many(dir_key, [value], ttl=ttl, _name="value")[0]

    def enqueue_many(
        self, dir_key: object, values: object, *, ttl: object = None, _name: str = "values"
    ) -> list[str]:
        """See `EtcdPatterns.enqueue_many`."""
        raw = self._keyspace.encode(dir_key, name="dir_key")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise InvalidTypeError(f"{_name} must be a list of str, not {type(values).__name__}")
        encoded = [encode_value(value, name="value") for value in values]
        lease_ttl = None if ttl is None else check_ttl(ttl)
        keys: list[str] = []
        for start in range(0, len(encoded), CHUNK):
            chunk = encoded[start : start + CHUNK]
            try:
                lease = 0 if lease_ttl is None else self._transport.lease_grant(lease_ttl).ID
                items = self._enqueue_chunk(raw, chunk, lease)
            except EtcdPatternsError as exc:
                if keys:
                    # Each chunk is its own transaction: the earlier ones stay.
                    exc.add_note(
                        f"the first {len(keys)} of {len(encoded)} values were enqueued before "
                        f"this failure, as {keys[0]!r} to {keys[-1]!r}; the rest were not"
                        + (", or may have been" if isinstance(exc, OutcomeUnknownError) else "")
                    )
                raise
            keys.extend(self._keyspace.decode(item) for item in items)
        return keys

    def _enqueue_chunk(self, raw: bytes, chunk: list[bytes], lease: int) -> list[bytes]:
        """Write one chunk of items under fresh keys, exactly once; their keys."""
        for _ in range(_KEY_TRIES):
            items = [raw + b"/" + self._new_id() for _ in chunk]
            committed = commit(
                self._transport,
                self._sessions.get,
                compare=[ops.compare_version(raw, "==", 0)]
                + [ops.compare_version(item, "==", 0) for item in items],
                success=[
                    ops.put(item, value, lease=lease)
                    for item, value in zip(items, chunk, strict=True)
                ],
                failure=[ops.get(raw, keys_only=True)],
            )
            if committed.succeeded:
                return items
            assert committed.responses is not None  # failures always carry responses
            if ops.kvs(committed.responses, 0):
                raise NotAValueError(self._keyspace.decode(raw))
            # Another writer used one of these names: draw new ones.
        raise EtcdError(
            f"queue {self._keyspace.decode(raw)!r}: {_KEY_TRIES} sets of generated keys were "
            "all taken already; this chunk was not enqueued (earlier chunks were)"
        )

    def _new_id(self) -> bytes:
        # Nanoseconds, kept strictly increasing within the process, then
        # random digits against other processes.
        with self._lock:
            self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
            stamp = self._last_stamp
        return f"{stamp:020d}-{secrets.token_hex(4)}".encode()

    # -- consuming ----------------------------------------------------------

    def dequeue(self, dir_key: object, *, timeout: object = None) -> str:
        """See `EtcdPatterns.dequeue`."""
        raw = self._keyspace.encode(dir_key, name="dir_key")
        deadline = Deadline(check_timeout(timeout))
        for candidate in self._candidates_until(raw, deadline):
            if self._take([candidate]):
                return candidate.value
        raise AssertionError("unreachable")  # pragma: no cover

    def _take(self, chosen: list[_Candidate], taken: Sequence[str] = ()) -> bool:
        """Delete these items, exactly once, if all are still there and unclaimed.

        Raises:
            OutcomeUnknownError: The take could not be settled; it names the
                values ``taken`` before it and the ones it may have taken.
        """
        try:
            committed = commit(
                self._transport,
                self._sessions.get,
                compare=[c for candidate in chosen for c in _unchanged_and_unclaimed(candidate)],
                success=[ops.delete(candidate.key) for candidate in chosen],
                failure=[],
            )
        except OutcomeUnknownError as exc:
            raise OutcomeUnknownError(
                f"{exc}; the items it may have taken are in 'uncertain'",
                taken=taken,
                uncertain=[candidate.value for candidate in chosen],
            ) from exc
        return committed.succeeded

    def dequeue_many(
        self, dir_key: object, max_items: object, *, timeout: object = None
    ) -> list[str]:
        """See `EtcdPatterns.dequeue_many`."""
        raw = self._keyspace.encode(dir_key, name="dir_key")
        max_items = check_count(max_items, name="max_items")
        deadline = Deadline(check_timeout(timeout))
        for first in self._candidates_until(raw, deadline):
            chosen = [first, *self._more_candidates(raw, min(max_items, CHUNK) - 1)]
            if not self._take(chosen):
                # Another consumer took some of them, but not necessarily
                # all: the others are still the oldest. Read afresh rather
                # than move on to newer ones, which would hand this
                # consumer a producer's items out of order.
                self._forget_candidates(raw)
                continue
            taken = [c.value for c in chosen]
            if len(taken) < max_items:
                # Taking what else is there is part of this one call:
                # it gets the time of one request, however long the
                # wait for the first item was allowed to be.
                follow_up = Deadline(self._transport.timeout)
                try:
                    self._take_available(raw, max_items, taken, follow_up)
                except OutcomeUnknownError:
                    raise  # it carries what is taken, and what may be
                except EtcdPatternsError:
                    # Nothing more was taken; what is taken is ours:
                    # hand it over rather than drop it.
                    pass
            return taken
        raise AssertionError("unreachable")  # pragma: no cover

    def _take_available(
        self, raw: bytes, wanted: int, taken: list[str], deadline: Deadline
    ) -> None:
        """Add to ``taken``, as they are taken, items there now, up to ``wanted`` in all.

        Stops early when the deadline passes: what is taken is returned then.
        """
        while len(taken) < wanted and not deadline.expired():
            chosen = self._more_candidates(raw, min(wanted - len(taken), CHUNK))
            if not chosen:
                chosen = self._read(raw, min(wanted - len(taken), CHUNK)).candidates
                if not chosen:
                    return
            if self._take(chosen, taken):
                taken += [c.value for c in chosen]
            else:
                self._forget_candidates(raw)  # as in dequeue_many

    def claim(self, dir_key: object, *, ttl: object = None, timeout: object = None) -> Claim:
        """See `EtcdPatterns.claim`."""
        raw = self._keyspace.encode(dir_key, name="dir_key")
        lease_ttl = None if ttl is None else check_ttl(ttl)
        deadline = Deadline(check_timeout(timeout))
        return Claim(self, raw, lease_ttl, deadline)

    def _claim_one(self, raw: bytes, lease_ttl: int | None, deadline: Deadline) -> ClaimedItem:
        for candidate in self._candidates_until(raw, deadline):
            # The claim's name is the item's, so that claims exclude one
            # another; its value is this attempt's alone, so that cleaning
            # up after a failed attempt can never delete a later claim.
            mine = Orphan(candidate.claim, value=secrets.token_hex(8).encode())

            def put_claim(session: Session, mine: Orphan = mine) -> list[Any]:
                # The claim lives on the lease of the session that commits it.
                assert mine.value is not None
                return [ops.put(mine.key, mine.value, lease=session.lease_id)]

            try:
                committed = commit(
                    self._transport,
                    lambda: self._sessions.get(lease_ttl),
                    compare=_unchanged_and_unclaimed(candidate),
                    success=put_claim,
                    failure=[],
                )
            except BaseException as exc:
                # Unsettled, or settled and then interrupted: a claim that
                # may exist must not outlive this call, or the item would
                # stay invisible for as long as the process lives.
                if isinstance(exc, EtcdPatternsError):
                    self._sessions.abandon(lease_ttl, mine)
                else:
                    self._sessions.withdraw(lease_ttl, mine)
                raise
            if committed.succeeded:
                return ClaimedItem(
                    key=self._keyspace.decode(candidate.key),
                    value=candidate.value,
                    fencing_token=committed.revision,
                    session=committed.session,
                    transport=self._transport,
                    item_key=candidate.key,
                    claim=candidate.claim,
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def ack(self, item: ClaimedItem) -> None:
        """Delete a claimed item and its claim, if the claim is still ours."""
        committed = commit(
            self._transport,
            self._sessions.get,
            compare=[item._holds()],
            success=[ops.delete(item._item_key), ops.delete(item.etcd_key)],
            failure=[],
        )
        if not committed.succeeded:
            raise ClaimLostError(
                f"the claim on {item.key!r} expired before it was acked; the item stays queued"
            )

    def release(self, item: ClaimedItem) -> None:
        """Give a claimed item back, at its place in the queue."""
        with self._lock:
            # The item is older than any cached candidate: read afresh.
            self._candidates.pop(item._item_key.rpartition(b"/")[0], None)
        # If etcd does not answer, the claim's session deletes the claim once
        # it does.
        item._session.withdraw(Orphan(item.etcd_key, item.fencing_token))

    def let_go(self, item: ClaimedItem) -> None:
        """Make sure a claim whose ack failed does not outlive its purpose.

        The ack may have applied (the claim is gone with the item) or not
        (the item must be offered again): deleting the claim, if it is
        still this one, is right either way. The session does it once etcd
        answers, so the item is available again within a refresh interval
        of etcd's return, not held for as long as the process lives.
        """
        item._session.abandon(Orphan(item.etcd_key, item.fencing_token))

    # -- machinery ----------------------------------------------------------

    def _candidates_until(self, raw: bytes, deadline: Deadline) -> Iterator[_Candidate]:
        """Yield candidate heads, oldest first, waiting when there are none.

        Raises:
            QueueEmptyError: The deadline passed with no candidate, or with
                every candidate taken by other consumers first.
            NotAValueError: ``raw`` holds a value of its own.
        """
        offered = False
        while True:
            cached = self._more_candidates(raw, 1)
            if cached:
                # A consumer that keeps losing races for items that are
                # there must still give up in time.
                if offered and deadline.expired():
                    raise QueueEmptyError(
                        f"queue {self._keyspace.decode(raw)!r}: other consumers took every "
                        "item first until the timeout"
                    )
                offered = True
                yield cached[0]
                continue
            heads = wait(
                self._transport,
                self._read(raw, self._prefetch),
                read=lambda: self._read(raw, self._prefetch),
                watch=lambda heads: None if heads.candidates else self._arrivals(raw),
                deadline=deadline,
                timeout_error=lambda: QueueEmptyError(
                    f"queue {self._keyspace.decode(raw)!r} stayed empty"
                ),
            )
            with self._lock:
                self._candidates.setdefault(raw, deque()).extend(heads.candidates)

    def _forget_candidates(self, raw: bytes) -> None:
        with self._lock:
            self._candidates.pop(raw, None)

    def _more_candidates(self, raw: bytes, wanted: int) -> list[_Candidate]:
        with self._lock:
            cached = self._candidates.get(raw)
            if not cached:
                return []
            return [cached.popleft() for _ in range(min(wanted, len(cached)))]

    def _claims_prefix(self, raw: bytes) -> bytes:
        return self._keyspace.internal("claims", raw.hex()) + b"/"

    def _read(self, raw: bytes, wanted: int) -> _Heads:
        """Up to ``wanted`` unclaimed items, oldest first, and the revision read at."""
        start, end = children_range(raw)
        claims = self._claims_prefix(raw)
        # Items enqueued by one transaction share a create revision, and etcd
        # breaks such ties arbitrarily: read a whole transaction's worth more
        # than wanted, so that the last, possibly cut, group can be dropped.
        limit = wanted + CHUNK
        while True:
            response = self._transport.txn(
                ops.txn(
                    compare=[ops.compare_version(raw, ">", 0)],
                    success=[ops.get(raw, keys_only=True)],
                    failure=[
                        ops.get(start, end, oldest_first=True, limit=limit),
                        ops.get(claims, prefix_end(claims), keys_only=True),
                    ],
                ),
                write=False,
            )
            if response.succeeded:
                raise NotAValueError(self._keyspace.decode(raw))
            found = sorted(ops.kvs(response.responses, 0), key=_fifo_order)
            cut = len(found) == limit
            if cut:
                last = found[-1].create_revision
                found = [kv for kv in found if kv.create_revision < last] or found
            claimed = {kv.key[len(claims) :] for kv in ops.kvs(response.responses, 1)}
            candidates: list[_Candidate] = []
            for kv in found:
                if not is_direct_child(raw, kv.key) or kv.key[len(start) :] in claimed:
                    continue
                try:
                    value = decode_value(kv.value, key=self._keyspace.decode(kv.key))
                except ValueDecodeError:
                    if candidates:
                        break  # serve the items before it; it will be the head next time
                    raise
                candidates.append(
                    _Candidate(kv.key, value, kv.mod_revision, claims + kv.key[len(start) :])
                )
            header: int = response.header.revision
            # Deeper keys and claimed items count against the limit: read
            # further only if they hid every item.
            if candidates or not cut:
                return _Heads(candidates[:wanted], header)
            limit *= 2

    def _arrivals(self, raw: bytes) -> Watch:
        """What an empty queue's consumer watches: an item put, or a claim gone."""
        start, end = children_range(raw)
        claims = self._claims_prefix(raw)
        creates = [
            etcdrpc.WatchCreateRequest(
                key=start, range_end=end, filters=[etcdrpc.WatchCreateRequest.NODELETE]
            ),
            etcdrpc.WatchCreateRequest(
                key=claims, range_end=prefix_end(claims), filters=[etcdrpc.WatchCreateRequest.NOPUT]
            ),
        ]

        def accept(event: Any) -> bool:
            if event.type == _DELETE:
                return True  # a claim released or expired
            return event.type == _PUT and is_direct_child(raw, event.kv.key)

        return Watch(creates, accept)


def _fifo_order(kv: Any) -> tuple[int, bytes]:
    # Within one enqueue transaction, item keys increase in enqueue order.
    return kv.create_revision, kv.key


def _unchanged_and_unclaimed(candidate: _Candidate) -> list[Any]:
    return [
        ops.compare_mod(candidate.key, "==", candidate.mod_revision),
        ops.compare_version(candidate.claim, "==", 0),
    ]


class Claim:
    """Context manager of `EtcdPatterns.claim`: acks on success, releases on error."""

    def __init__(self, queue: Queue, raw: bytes, lease_ttl: int | None, deadline: Deadline) -> None:
        self._queue = queue
        self._raw = raw
        self._lease_ttl = lease_ttl
        self._deadline = deadline
        self._item: ClaimedItem | None = None

    def __enter__(self) -> ClaimedItem:
        self._item = self._queue._claim_one(self._raw, self._lease_ttl, self._deadline)
        return self._item

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        item, self._item = self._item, None
        if item is None:
            return
        if exc_type is not None:
            self._queue.release(item)
            return
        try:
            self._queue.ack(item)
        except ClaimLostError:
            raise
        except BaseException:
            self._queue.let_go(item)
            raise
