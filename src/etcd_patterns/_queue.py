"""A priority queue in which exactly one consumer receives each item.

Layout: the items of queue ``dir_key`` are its direct children
``dir_key/<id>``. An id is ``<priority + 1000, 4 digits>-<enqueue time in
ns, 20 digits>-<8 random hex digits>``, so ids sort by priority, then by
enqueue time, and ``get_values(dir_key)`` lists what is pending in the order
it is served. Consumers take items in key order. Beside each item, under
``<namespace>.etcd-patterns/``, live:

* its claim, ``claims/<hex of dir_key>/<id>``, on the claimer's session
  lease, while a consumer holds it in claim/ack mode;
* its delivery record, ``deliveries/<hex of dir_key>/<id>``, once it has
  been claimed: a JSON object with the number of deliveries, the last
  error a consumer released it with, and the wall-clock time before which
  it is not delivered again. The record carries the item's own lease, if
  any, so that it goes when the item expires.

Guarantees:

* Every enqueued item is delivered exactly once by `dequeue`: taking an item
  is a transaction that deletes it only if it is unchanged, unclaimed and
  has the delivery record that was read, sent through the exactly-once
  commit (`_commit`), so that a lost answer neither loses the item nor
  hands it out twice. `enqueue` is exactly-once the same way. So is moving
  an item to its dead-letter queue.
* Order: each consumer takes the first item in key order that it saw and
  nobody took first. Lower priorities are served first; within a priority,
  items go in order of enqueue time as the producer's clock stamped it, so
  one producer's items reach any one consumer in that producer's order.
* A claim counts a delivery, in the claim's own transaction: a consumer
  that crashes has used one. An item due its ``max_deliveries + 1``-th
  delivery moves instead, in one transaction, to the dead-letter queue.
  So does an item that is not UTF-8, when a consumer asks for `str`.
* A released item is delivered again only after a delay that doubles with
  each delivery, up to `MAX_REDELIVERY_DELAY`, while other items flow.
* An item enqueued with a ``ttl`` carries its own lease and vanishes,
  undelivered, once the lease expires.
* A blocked `dequeue` wakes on a watch, within milliseconds of an enqueue
  or of a claim's release. It waits in the shared wait loop (`_wait`), so
  nothing that happens between its read and its watch is missed; a
  consumer waiting only for a delayed item reads again when its delay ends.

Lease loss: a consumer whose session lease is lost while it holds a claim
loses the claim; its ack raises `ClaimLostError` and removes nothing, since
another consumer may already have the item. The delivery counts.

Cost: `enqueue` is one round trip. `dequeue` reads a batch of candidate
heads (one round trip) and then takes one per call (one round trip each).
A take, or a claim, tries the first six candidates in order in one
transaction, nesting one per item, so a consumer that loses the race for
the head takes the next in the same round trip; if all six are gone, the
innermost transaction reads the fresh heads, and a take that empties the
cache reads the next ones. `dequeue_many(n)` reads n heads, then takes
them 60 per transaction. A claim, an ack and a release are one round trip
each.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, NamedTuple

from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from . import _ops as ops
from ._commit import Committed, commit
from ._errors import (
    ClaimLostError,
    ConflictError,
    EtcdError,
    EtcdPatternsError,
    InvalidArgumentError,
    InvalidTypeError,
    LeaseNotFoundError,
    NotAValueError,
    OutcomeUnknownError,
    QueueEmptyError,
    ValueDecodeError,
    ValueTooLargeError,
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

log = logging.getLogger(__name__)

# How many candidate heads one read fetches, by default: the amortised cost
# of a dequeue is 1 + 1/PREFETCH round trips.
PREFETCH = 16
# Items per transaction in the batch calls, within etcd's default
# --max-txn-ops of 128 operations in each of a transaction's compares,
# success and failure (a take needs two compares and two deletes per item,
# and the commit's bookkeeping one more of each).
CHUNK = 60
# How far past the head a consumer looks for an item that is neither claimed
# nor delayed, when the first read found none.
FAR = 1024
# How many items one chained take tries, in order, in one round trip.
CHAIN = 6
# Items per transaction when moving dead letters back: four compares and
# four operations each.
REQUEUE_CHUNK = 30
# The priorities an item may have; lower is served first.
PRIORITY_MIN = -1000
PRIORITY_MAX = 1000
# What a dead-letter queue is called unless a consumer names one.
DEAD_LETTER_SUFFIX = ".dead"
# The delay before a released item's first redelivery, by default; it
# doubles with each delivery, up to MAX_REDELIVERY_DELAY.
REDELIVERY_DELAY = 1.0
MAX_REDELIVERY_DELAY = 60.0
# How much of a release's error text a delivery record keeps.
ERROR_CHARS = 1000
# How many sets of fresh item keys an enqueue draws before giving up: a
# collision needs another writer to pick the same nanosecond and random tag.
_KEY_TRIES = 3
# Room a one-item transaction needs besides its value and keys: the
# transport's own margin, the commit's slot and the framing.
_MARGIN = 1024
_ID = re.compile(rb"(\d{4})-(\d{20})-[0-9a-f]{8}")

_PUT = kv_pb2.Event.PUT
_DELETE = kv_pb2.Event.DELETE


def check_priority(priority: object) -> int:
    """Validate a ``priority``: an int from `PRIORITY_MIN` to `PRIORITY_MAX`."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidTypeError(f"priority must be an int, not {priority!r}")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InvalidArgumentError(
            f"priority must be from {PRIORITY_MIN} to {PRIORITY_MAX}, not {priority}"
        )
    return priority


def parse_id(item_id: bytes) -> tuple[int, float] | None:
    """The priority and enqueue time (Unix seconds) in an item's id; None if not the library's."""
    match = _ID.fullmatch(item_id)
    if match is None:
        return None
    return int(match[1]) + PRIORITY_MIN, int(match[2]) / 1e9


@dataclass(frozen=True)
class _Record:
    """An item's delivery record: what the claims of it left behind.

    Attributes:
        deliveries: How many times it was claimed.
        error: The error its last release gave, if any.
        retry_at: The Unix time before which it is not delivered again.
        reason: Why it was moved to a dead-letter queue, if it was.
    """

    deliveries: int = 0
    error: str | None = None
    retry_at: float | None = None
    reason: str | None = None

    def encode(self) -> bytes:
        fields: dict[str, object] = {"deliveries": self.deliveries}
        fields |= {
            name: value
            for name, value in (
                ("error", self.error),
                ("retry_at", self.retry_at),
                ("reason", self.reason),
            )
            if value is not None
        }
        return json.dumps(fields, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> _Record:
        # A record that is not the library's counts as none, rather than
        # wedging the item behind it.
        try:
            fields = json.loads(raw)
            deliveries = fields.get("deliveries", 0)
            retry_at = fields.get("retry_at")
            return cls(
                deliveries=deliveries if isinstance(deliveries, int) else 0,
                error=_str_or_none(fields.get("error")),
                retry_at=_due_time(retry_at),
                reason=_str_or_none(fields.get("reason")),
            )
        except (ValueError, AttributeError):
            return cls()


def _due_time(value: object) -> float | None:
    """A record's ``retry_at``, trusted only as far as a release could have set it.

    No release delays an item past `MAX_REDELIVERY_DELAY`: a later time
    comes from a clock far ahead of this one, or from another tool, and
    must not hide the item for long. It counts as that far away at most.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return min(float(value), time.time() + MAX_REDELIVERY_DELAY)


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class _Candidate:
    """An item that was there, unclaimed, when last read.

    Attributes:
        key: The item's etcd key.
        value: Its value, as stored.
        mod_revision: Its mod revision when read.
        lease: The lease it carries; 0 for none.
        claim: The etcd key of its claim.
        record_key: The etcd key of its delivery record.
        record_mod: The record's mod revision when read; 0 if it had none.
        record: The record's contents.
    """

    key: bytes
    value: bytes
    mod_revision: int
    lease: int
    claim: bytes
    record_key: bytes
    record_mod: int
    record: _Record

    def decoded(self, keyspace: Keyspace) -> str:
        return decode_value(self.value, key=keyspace.decode(self.key))


class _Heads(NamedTuple):
    """The first available items of a queue, from one read.

    Attributes:
        candidates: In the order they are served.
        revision: The revision the read reflects.
        retry_at: The earliest Unix time at which an item read but held
            back by its redelivery delay becomes available; None if none is.
        complete: Whether the read saw every item (it was not cut short by
            its limit).
    """

    candidates: list[_Candidate]
    revision: int
    retry_at: float | None
    complete: bool


@dataclass(frozen=True)
class QueuedItem:
    """An item as `EtcdPatterns.peek` shows it, without taking it.

    Attributes:
        key: The item's key, without the namespace.
        value: Its value; None if it is not UTF-8 (see ``value_bytes``).
        value_bytes: Its value, as stored.
        priority: Its priority; None for a key that the library did not
            name (an item put by another tool).
        enqueued_at: When it was enqueued, in Unix seconds, by the
            producer's clock; None for a key that the library did not name.
        delivery_count: How many times it has been claimed.
        last_error: The error it was last released with, if any.
        claimed: Whether a consumer holds it now.
        retry_at: The Unix time before which it is not delivered again, if
            a release delayed it.
        reason: Why it is in a dead-letter queue, if it was moved there.
    """

    key: str
    value: str | None
    value_bytes: bytes
    priority: int | None
    enqueued_at: float | None
    delivery_count: int
    last_error: str | None
    claimed: bool
    retry_at: float | None
    reason: str | None


@dataclass(frozen=True)
class QueueStats:
    """The state of a queue, as `EtcdPatterns.queue_stats` reads it in one round trip.

    Attributes:
        pending: How many unclaimed items wait, by priority (items that
            another tool named count as priority 0). Includes ``delayed``.
        in_flight: How many items consumers hold claimed.
        delayed: How many pending items wait out a redelivery delay.
        oldest_age: Seconds since the oldest unclaimed item was enqueued,
            by the producer's clock; None when there is none.
        dead_letters: How many items are in the dead-letter queue.
        revision: The etcd revision these numbers reflect.
    """

    pending: dict[int, int]
    in_flight: int
    delayed: int
    oldest_age: float | None
    dead_letters: int
    revision: int

    @property
    def total_pending(self) -> int:
        """Every unclaimed item, whatever its priority."""
        return sum(self.pending.values())


def redelivery_delay(first: float, deliveries: int) -> float:
    """The delay before the next delivery of an item released after ``deliveries``."""
    doubled = first * 2.0 ** min(max(deliveries - 1, 0), 64)
    return min(doubled, MAX_REDELIVERY_DELAY)


@dataclass(frozen=True)
class _Policy:
    """What a consumer does with items that fail or cannot be decoded.

    Attributes:
        dead_letter: The etcd key of the dead-letter queue.
        decode: Whether values are delivered as `str`; undecodable items
            then go to the dead-letter queue.
        max_deliveries: The most deliveries an item may have; None for no
            limit.
        redelivery_delay: The first delay before a released item is
            delivered again.
    """

    dead_letter: bytes
    decode: bool = True
    max_deliveries: int | None = None
    redelivery_delay: float = REDELIVERY_DELAY


class ClaimedItem(Fence):
    """An item held by a claim, inside ``with etcd.claim(dir_key) as item:``. A `Fence`.

    Attributes:
        key: The item's key, without the namespace.
        value_bytes: The item's value, as stored.
        priority: Its priority; None for an item another tool put.
        delivery_count: How many times it has been claimed, this time
            included. A claim lost in a crash counts.
        last_error: The error a previous delivery was released with, if any.
        fencing_token: The create revision of the claim: it increases with
            every claim of the queue, so a store can reject the writes of a
            consumer whose claim has since expired and been replaced.
        lease_id: The session lease that the claim carries.
    """

    def __init__(
        self,
        *,
        queue: Queue,
        candidate: _Candidate,
        policy: _Policy,
        fencing_token: int,
        session: Session,
    ) -> None:
        super().__init__(
            etcd_key=candidate.claim,
            fencing_token=fencing_token,
            session=session,
            transport=queue._transport,
        )
        self.key = queue._keyspace.decode(candidate.key)
        self.value_bytes = candidate.value
        parsed = parse_id(candidate.key.rpartition(b"/")[2])
        self.priority = None if parsed is None else parsed[0]
        self.delivery_count = candidate.record.deliveries  # as the claim recorded it
        self.last_error = candidate.record.error
        self._queue = queue
        self._candidate = candidate
        self._policy = policy
        self._settled: str | None = None

    @property
    def value(self) -> str:
        """The item's value as `str`.

        Raises:
            ValueDecodeError: It is not UTF-8 (only claimed with
                ``decode=False``; see ``value_bytes``).
        """
        return self._candidate.decoded(self._queue._keyspace)

    def __repr__(self) -> str:
        return (
            f"<ClaimedItem {self.key!r} delivery_count={self.delivery_count} "
            f"fencing_token={self.fencing_token}>"
        )

    def ack(self) -> None:
        """Delete the item, its claim and its record, in one transaction: one round trip.

        Raises:
            ClaimLostError: The claim had expired, or was already acked or
                released; nothing was deleted.
        """
        self._settle("acked")
        try:
            self._queue._ack(self)
        except ClaimLostError:
            raise
        except BaseException:
            self._queue._let_go(self)
            raise

    def release(self, error: BaseException | str | None = None) -> None:
        """Give the item back, to be delivered again after its redelivery delay.

        If this was its last allowed delivery, it moves to the dead-letter
        queue instead. One round trip.

        Args:
            error: What went wrong, kept in the item's record (its first
                1,000 characters) for the next consumer, `peek` and the
                dead-letter queue.

        Raises:
            ClaimLostError: The claim had expired, or was already acked or
                released; nothing was changed.
        """
        text = _error_text(error)
        self._settle("released")
        self._queue._release(self, text)

    def _settle(self, how: str) -> None:
        if self._settled is not None:
            raise ClaimLostError(f"the claim on {self.key!r} was already {self._settled}")
        self._settled = how

    def _lost_error(self, consequence: str) -> ClaimLostError:
        return ClaimLostError(f"the claim on {self.key!r} is gone; {consequence}")


def _error_text(error: BaseException | str | None) -> str | None:
    if error is None:
        return None
    if isinstance(error, BaseException):
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    elif isinstance(error, str):
        text = error
    else:
        raise InvalidTypeError(f"error must be an exception, a str or None, not {error!r}")
    return text[:ERROR_CHARS]


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
        # How many items a take tries; 1 takes only the first (benchmarks
        # compare the two).
        self._chain = CHAIN

    # -- producing ----------------------------------------------------------

    def enqueue(
        self, dir_key: object, value: object, *, ttl: object = None, priority: object = 0
    ) -> str:
        """See `EtcdPatterns.enqueue`."""
        return self.enqueue_many(dir_key, [value], ttl=ttl, priority=priority, _name="value")[0]

    def enqueue_many(
        self,
        dir_key: object,
        values: object,
        *,
        ttl: object = None,
        priority: object = 0,
        _name: str = "values",
    ) -> list[str]:
        """See `EtcdPatterns.enqueue_many`."""
        raw = self._keyspace.encode(dir_key, name="dir_key")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise InvalidTypeError(f"{_name} must be a list of str, not {type(values).__name__}")
        encoded = [encode_value(value, name="value") for value in values]
        limit = self._transport.max_request_bytes
        for index, value in enumerate(encoded):
            # Refused before anything is written, rather than after the
            # values before it.
            if len(value) + _MARGIN + 3 * (len(raw) + 64) > limit:
                raise ValueTooLargeError(
                    f"value {index} has {len(value)} bytes; etcd takes requests of at most "
                    f"{limit} bytes (max_request_bytes); nothing was enqueued"
                )
        lease_ttl = None if ttl is None else check_ttl(ttl)
        level = check_priority(priority)
        keys: list[str] = []
        for chunk in self._by_size(raw, encoded, CHUNK, keys_per_item=2):
            try:
                lease = 0 if lease_ttl is None else self._transport.lease_grant(lease_ttl).ID
                items = self._enqueue_chunk(raw, chunk, lease, level)
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

    def _enqueue_chunk(
        self, raw: bytes, chunk: list[bytes], lease: int, priority: int
    ) -> list[bytes]:
        """Write one chunk of items under fresh keys, exactly once; their keys."""
        for _ in range(_KEY_TRIES):
            items = [raw + b"/" + self._new_id(priority) for _ in chunk]
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

    def _by_size(
        self, raw: bytes, values: list[bytes], most: int, *, keys_per_item: int
    ) -> list[list[bytes]]:
        """``values`` in order, cut into runs that one transaction can carry.

        A run has at most ``most`` values, and its values and keys fit in
        half of etcd's request limit, leaving room for the rest of the
        transaction. A value too large for any request has a run of its own,
        which the transport refuses before sending anything.
        """
        budget = self._transport.max_request_bytes // 2
        # Each key at most as long as an item's delivery record's, and framing.
        per_item = keys_per_item * (len(self._records_prefix(raw)) + 48)
        runs: list[list[bytes]] = []
        run: list[bytes] = []
        size = 0
        for value in values:
            cost = len(value) + per_item
            if run and (len(run) == most or size + cost > budget):
                runs.append(run)
                run, size = [], 0
            run.append(value)
            size += cost
        if run:
            runs.append(run)
        return runs

    def _new_id(self, priority: int = 0) -> bytes:
        # The priority, then nanoseconds, kept strictly increasing within
        # the process, then random digits against other processes.
        with self._lock:
            self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
            stamp = self._last_stamp
        return f"{priority - PRIORITY_MIN:04d}-{stamp:020d}-{secrets.token_hex(4)}".encode()

    # -- consuming ----------------------------------------------------------

    def policy(
        self,
        raw: bytes,
        *,
        dead_letter: object = None,
        decode: object = True,
        max_deliveries: object = None,
        redelivery_delay: object = REDELIVERY_DELAY,
    ) -> _Policy:
        """Validate a consumer's options for the queue ``raw``."""
        if dead_letter is None:
            dead = raw + DEAD_LETTER_SUFFIX.encode()
        else:
            dead = self._keyspace.encode(dead_letter, name="dead_letter")
            if dead == raw:
                raise InvalidArgumentError(
                    f"dead_letter {dead_letter!r} must not be the queue itself"
                )
        if not isinstance(decode, bool):
            raise InvalidTypeError(f"decode must be True or False, not {decode!r}")
        limit = (
            None if max_deliveries is None else check_count(max_deliveries, name="max_deliveries")
        )
        delay = check_timeout(redelivery_delay, name="redelivery_delay")
        if delay is None:
            raise InvalidTypeError("redelivery_delay must be a number of seconds, not None")
        if delay > MAX_REDELIVERY_DELAY:
            raise InvalidArgumentError(
                f"redelivery_delay must be at most {MAX_REDELIVERY_DELAY} s, not {delay}"
            )
        return _Policy(dead, decode, limit, delay)

    def dequeue(
        self,
        dir_key: object,
        *,
        timeout: object = None,
        decode: object = True,
        dead_letter: object = None,
    ) -> str | bytes:
        """See `EtcdPatterns.dequeue`."""
        raw = self._keyspace.encode(dir_key, name="dir_key")
        policy = self.policy(raw, dead_letter=dead_letter, decode=decode)
        wait_for = check_timeout(timeout)
        deadline, tidy = Deadline(wait_for), self._tidy_until(wait_for)
        for candidate in self._candidates_until(raw, deadline, policy, tidy):
            chain = [candidate, *self._chain_behind(raw, policy)]
            try:
                taken, fresh = self._take_first(chain, raw, policy)
            except BaseException:
                # Candidates behind one whose take failed must not be
                # served before it: read afresh next time.
                self._forget_candidates(raw)
                raise
            if taken is not None:
                return self._deliver(taken, policy)
            assert fresh is not None  # nothing taken: the heads read instead
            self._cache(raw, fresh.candidates)
        raise AssertionError("unreachable")  # pragma: no cover

    def _chain_behind(self, raw: bytes, policy: _Policy) -> list[_Candidate]:
        """The cached candidates after the first, up to a chain's length, that can be delivered.

        They stay cached; a candidate that would have to be moved aside
        ends the chain.
        """
        behind: list[_Candidate] = []
        with self._lock:
            for candidate in list(self._candidates.get(raw, ()))[: self._chain - 1]:
                if policy.decode and not _decodes(candidate.value):
                    break
                limit = policy.max_deliveries
                if limit is not None and candidate.record.deliveries >= limit:
                    break
                behind.append(candidate)
        return behind

    def _take_first(
        self, chain: list[_Candidate], raw: bytes, policy: _Policy
    ) -> tuple[_Candidate | None, _Heads | None]:
        """Delete the first of these items still there and unclaimed, exactly once.

        One transaction nests one per item: each deletes its item if the
        item is as read and unclaimed, and otherwise tries the next. So a
        consumer that loses the race for the head takes the next one in the
        same round trip, in order.

        Returns:
            The item taken, and the cache holds the chain's items behind
            it; or, if every item was gone, the fresh heads that the
            innermost transaction read.

        Raises:
            OutcomeUnknownError: The take could not be settled; its items
                are in ``uncertain``.
        """
        with self._lock:
            # Whether taking the chain's last item leaves nothing cached:
            # then its transaction reads the next heads, too.
            refill = len(self._candidates.get(raw, ())) < len(chain)
        read = self._read_ops(raw, self._prefetch)
        levels = [
            (
                _unchanged_and_unclaimed(candidate, record=False),
                [ops.delete(candidate.key), ops.delete(candidate.record_key)],
            )
            for candidate in chain
        ]
        if refill:
            levels[-1][1].extend(read)
        try:
            committed = commit(
                self._transport,
                self._sessions.get,
                compare=[],
                success=_nest(levels, read),
                failure=[],
            )
            assert committed.succeeded  # no compare of the caller's own
            if committed.responses is None:
                found = self._which_was_taken(chain, committed.revision)
                if found is None:  # every item was gone: nothing taken
                    return None, _Heads([], committed.revision, None, complete=False)
                index = found
            else:
                level, response = _which_level(committed.responses, len(chain))
                if level is None:
                    heads = self._heads(raw, response.responses, committed.revision, self._prefetch)
                    return None, heads
                index = level
        except OutcomeUnknownError as exc:
            raise OutcomeUnknownError(
                f"{exc}; the items it may have taken are in 'uncertain'",
                uncertain=[self._deliver(candidate, policy) for candidate in chain],
            ) from exc
        if refill and index == len(chain) - 1 and committed.responses is not None:
            heads = self._heads(raw, response.responses[2:], committed.revision, self._prefetch)
            self._cache(raw, heads.candidates)
            return chain[index], None
        self._drop_cached(raw, chain[1 : index + 1])
        return chain[index], None

    def _drop_cached(self, raw: bytes, gone: list[_Candidate]) -> None:
        """Forget cached candidates that a chain found gone, or took.

        Those behind them stay cached. Other threads of this instance share
        the cache, so they are removed by key, not by position.
        """
        keys = {candidate.key for candidate in gone}
        if keys:
            with self._lock:
                cached = self._candidates.get(raw)
                if cached:
                    self._candidates[raw] = deque(c for c in cached if c.key not in keys)

    def _which_was_taken(self, chain: list[_Candidate], revision: int) -> int | None:
        """Which item of a chained take applied at ``revision``, from etcd's history.

        Only that transaction wrote at that revision: its item is the first
        of the chain that existed, as read, just before it, and not at it.
        None if there is none: every item was gone, and the transaction
        took nothing.

        Raises:
            OutcomeUnknownError: The history is compacted away.
        """
        try:
            response = self._transport.txn(
                ops.txn(
                    compare=[],
                    success=[
                        ops.get(candidate.key, keys_only=True, revision=at)
                        for at in (revision - 1, revision)
                        for candidate in chain
                    ],
                    failure=[],
                ),
                write=False,
            )
        except EtcdPatternsError as exc:
            raise OutcomeUnknownError(
                f"a take applied at revision {revision}; which of its items it took is "
                f"unknown: {exc}"
            ) from exc
        for index, candidate in enumerate(chain):
            before = ops.kvs(response.responses, index)
            after = ops.kvs(response.responses, len(chain) + index)
            if any(kv.mod_revision == candidate.mod_revision for kv in before) and not after:
                return index
        return None

    def _deliver(self, candidate: _Candidate, policy: _Policy) -> str | bytes:
        return candidate.decoded(self._keyspace) if policy.decode else candidate.value

    def _tidy_until(self, timeout: float | None) -> Deadline:
        """Until when a call may move undeliverable items aside: its timeout, or one request's."""
        return Deadline(None if timeout is None else max(timeout, self._transport.timeout))

    def _deliverable(self, candidate: _Candidate, policy: _Policy, tidy: Deadline) -> bool:
        """Whether to deliver a candidate; moves it to the dead letters if not.

        An item that is not UTF-8, when the consumer wants `str`, and an
        item due a delivery past ``max_deliveries`` (a consumer that crashed
        with it used one) are moved to the dead-letter queue, by whichever
        consumer gets there first, so that they never block the items
        behind them. Once ``tidy`` passes, they are only skipped, so that a
        call meeting many of them still ends in time.
        """
        deliveries = candidate.record.deliveries
        if policy.max_deliveries is not None and deliveries >= policy.max_deliveries:
            if not tidy.expired():
                self._bury(candidate, policy, reason=_too_many(deliveries, policy))
            return False
        if not policy.decode:
            return True
        try:
            candidate.decoded(self._keyspace)
        except ValueDecodeError:
            if tidy.expired():
                return False
            moved = self._bury(candidate, policy, reason="the value is not UTF-8")
            if moved:
                log.warning(
                    "queue item %r is not UTF-8; moved it to the dead-letter queue %r",
                    self._keyspace.decode(candidate.key),
                    self._keyspace.decode(policy.dead_letter),
                )
            return False
        return True

    def _take(
        self,
        chosen: list[_Candidate],
        raw: bytes,
        policy: _Policy,
        *,
        refill: int,
        taken: Sequence[str | bytes] = (),
    ) -> _Heads | None:
        """Delete these items, exactly once, if all are still there and unclaimed.

        Returns:
            None if they were taken. Otherwise the first ``refill``
            available items, which the failed take read in its failure
            branch, so that a consumer that lost a race need not read again.

        Raises:
            OutcomeUnknownError: The take could not be settled; it names the
                values ``taken`` before it and the ones it may have taken.
        """
        if not chosen:
            return None
        try:
            committed = commit(
                self._transport,
                self._sessions.get,
                compare=[
                    c
                    for candidate in chosen
                    for c in _unchanged_and_unclaimed(candidate, record=False)
                ],
                success=[
                    op
                    for candidate in chosen
                    for op in (ops.delete(candidate.key), ops.delete(candidate.record_key))
                ],
                failure=self._read_ops(raw, refill),
            )
        except OutcomeUnknownError as exc:
            raise OutcomeUnknownError(
                f"{exc}; the items it may have taken are in 'uncertain'",
                taken=taken,
                uncertain=[self._deliver(candidate, policy) for candidate in chosen],
            ) from exc
        if committed.succeeded:
            return None
        assert committed.responses is not None  # failures always carry responses
        return self._heads(raw, committed.responses, committed.revision, refill)

    def dequeue_many(
        self,
        dir_key: object,
        max_items: object,
        *,
        timeout: object = None,
        decode: object = True,
        dead_letter: object = None,
    ) -> list[Any]:
        """See `EtcdPatterns.dequeue_many`."""
        raw = self._keyspace.encode(dir_key, name="dir_key")
        wanted = check_count(max_items, name="max_items")
        policy = self.policy(raw, dead_letter=dead_letter, decode=decode)
        wait_for = check_timeout(timeout)
        deadline, tidy = Deadline(wait_for), self._tidy_until(wait_for)
        taken: list[Any] = []
        offered = False
        # The first item gets the caller's timeout; taking what else is
        # there is part of the same call, and gets the time of one request.
        follow_up: Deadline | None = None
        heads = self._cached_heads(raw, wanted)
        while True:
            if offered and not taken and deadline.expired():
                raise _outrun(self._keyspace.decode(raw))
            if heads is None:
                heads = self._wait_for_heads(raw, max(wanted, self._prefetch), deadline)
            try:
                heads, missed = self._take_batch(raw, heads, policy, wanted, taken, tidy=tidy)
            except OutcomeUnknownError as exc:
                if exc.taken or not taken:
                    raise  # it carries what is taken, and what may be
                # Moving an item aside went unsettled: what is taken is
                # the caller's all the same.
                raise OutcomeUnknownError(str(exc), taken=taken, uncertain=exc.uncertain) from exc
            except EtcdPatternsError:
                if not taken:
                    raise
                return taken  # nothing more was taken; what is taken is ours
            offered |= missed
            if not taken:
                heads = heads if heads.candidates else None
                continue
            follow_up = follow_up or Deadline(self._transport.timeout)
            if len(taken) < wanted and not follow_up.expired() and not heads.candidates:
                more = self._read_more(raw, heads, wanted - len(taken))
                if more is None:
                    return taken
                heads = more
            if len(taken) == wanted or follow_up.expired():
                self._cache(raw, heads.candidates)
                return taken

    def _take_batch(
        self,
        raw: bytes,
        heads: _Heads,
        policy: _Policy,
        wanted: int,
        taken: list[Any],
        *,
        tidy: Deadline,
    ) -> tuple[_Heads, bool]:
        """Take the first heads, up to ``wanted`` in all, adding them to ``taken``.

        Returns:
            The heads left, and whether items were missed: the take lost a
            race, or items were skipped once ``tidy`` passed. After a lost
            race, another consumer took some of the items, but not
            necessarily all: the failed take read the heads afresh, in
            order, and those are left, so this consumer skips none of a
            producer's items.
        """
        batch = heads.candidates[: min(wanted - len(taken), CHUNK)]
        chosen = [c for c in batch if self._deliverable(c, policy, tidy)]
        fresh = self._take(chosen, raw, policy, refill=wanted - len(taken), taken=taken)
        if fresh is not None:
            return fresh, True
        taken += [self._deliver(c, policy) for c in chosen]
        rest = heads._replace(candidates=heads.candidates[len(batch) :])
        return rest, len(chosen) < len(batch) and tidy.expired()

    def _read_more(self, raw: bytes, heads: _Heads, wanted: int) -> _Heads | None:
        """After every head was taken: the next ones, unless the read saw them all."""
        if heads.complete:
            return None
        try:
            more = self._read(raw, wanted)
        except EtcdPatternsError:
            return None  # what is taken is ours: hand it over
        return more if more.candidates else None

    def claim(
        self,
        dir_key: object,
        *,
        ttl: object = None,
        timeout: object = None,
        max_deliveries: object = None,
        dead_letter: object = None,
        redelivery_delay: object = REDELIVERY_DELAY,
        decode: object = True,
    ) -> Claim:
        """See `EtcdPatterns.claim`."""
        raw = self._keyspace.encode(dir_key, name="dir_key")
        lease_ttl = None if ttl is None else check_ttl(ttl)
        policy = self.policy(
            raw,
            dead_letter=dead_letter,
            decode=decode,
            max_deliveries=max_deliveries,
            redelivery_delay=redelivery_delay,
        )
        wait_for = check_timeout(timeout)
        return Claim(
            self, raw, lease_ttl, Deadline(wait_for), policy, tidy=self._tidy_until(wait_for)
        )

    def _claim_one(
        self,
        raw: bytes,
        lease_ttl: int | None,
        deadline: Deadline,
        policy: _Policy,
        tidy: Deadline,
    ) -> ClaimedItem:
        for candidate in self._candidates_until(raw, deadline, policy, tidy):
            chain = [candidate, *self._chain_behind(raw, policy)]
            # A claim's name is its item's, so that claims exclude one
            # another; its value is this attempt's alone, so that cleaning
            # up after a failed attempt can never delete a later claim.
            token = secrets.token_hex(8).encode()
            mine = [Orphan(c.claim, value=token) for c in chain]
            counted = [
                replace(c.record, deliveries=c.record.deliveries + 1, retry_at=None) for c in chain
            ]

            def claims(
                session: Session,
                chain: list[_Candidate] = chain,
                token: bytes = token,
                counted: list[_Record] = counted,
            ) -> list[Any]:
                # Each claim lives on the lease of the session that commits it.
                levels = [
                    (
                        _unchanged_and_unclaimed(c),
                        [
                            ops.put(c.claim, token, lease=session.lease_id),
                            ops.put(c.record_key, record.encode(), lease=c.lease),
                        ],
                    )
                    for c, record in zip(chain, counted, strict=True)
                ]
                return _nest(levels, self._read_ops(raw, self._prefetch))

            try:
                committed = commit(
                    self._transport,
                    lambda: self._sessions.get(lease_ttl),
                    compare=[],
                    success=claims,
                    failure=[],
                )
                index = self._which_claimed(raw, chain, token, committed)
            except LeaseNotFoundError:
                self._forget_candidates(raw)
                continue  # the claimed item's own lease expired: it is gone
            except BaseException as exc:
                self._forget_candidates(raw)  # as in dequeue
                # Unsettled, or settled and then interrupted: a claim that
                # may exist must not outlive this call, or its item would
                # stay invisible for as long as the process lives.
                if isinstance(exc, EtcdPatternsError):
                    for orphan in mine:
                        self._sessions.abandon(lease_ttl, orphan)
                    raise
                # Interrupted: all to the janitor first, so that a second
                # interrupt leaves none behind; then delete them now, while
                # etcd answers (the janitor keeps the one that fails).
                for orphan in mine[1:]:
                    self._sessions.abandon(lease_ttl, orphan)
                for orphan in mine:
                    if not self._sessions.withdraw(lease_ttl, orphan):
                        break
                raise
            if index is not None:
                return ClaimedItem(
                    queue=self,
                    candidate=replace(
                        chain[index], record_mod=committed.revision, record=counted[index]
                    ),
                    policy=policy,
                    fencing_token=committed.revision,
                    session=committed.session,
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def _which_claimed(
        self, raw: bytes, chain: list[_Candidate], token: bytes, committed: Committed
    ) -> int | None:
        """Which item of a chained claim the committed transaction claimed; None for none.

        When nothing was claimed, the fresh heads that the innermost
        transaction read replace the cache. After a lost answer, the claims
        themselves tell: only this attempt's claim holds its token.
        """
        assert committed.succeeded  # no compare of the caller's own
        if committed.responses is not None:
            index, response = _which_level(committed.responses, len(chain))
            if index is None:
                heads = self._heads(raw, response.responses, committed.revision, self._prefetch)
                self._cache(raw, heads.candidates)
            else:
                self._drop_cached(raw, chain[1 : index + 1])
            return index
        self._forget_candidates(raw)
        try:
            response = self._transport.txn(
                ops.txn(compare=[], success=[ops.get(c.claim) for c in chain], failure=[]),
                write=False,
            )
        except EtcdPatternsError as exc:
            raise OutcomeUnknownError(
                f"a claim applied at revision {committed.revision}; which item it claimed "
                f"is unknown: {exc}"
            ) from exc
        for index in range(len(chain)):
            if any(kv.value == token for kv in ops.kvs(response.responses, index)):
                return index
        return None

    def _ack(self, item: ClaimedItem) -> None:
        """Delete a claimed item, its claim and its record, if the claim is still ours."""
        candidate = item._candidate
        committed = commit(
            self._transport,
            self._sessions.get,
            compare=[item._holds()],
            success=[
                ops.delete(candidate.key),
                ops.delete(item.etcd_key),
                ops.delete(candidate.record_key),
            ],
            failure=[],
        )
        if not committed.succeeded:
            raise ClaimLostError(
                f"the claim on {item.key!r} expired before it was acked; the item stays queued"
            )

    def _release(self, item: ClaimedItem, error: str | None) -> None:
        """Give a claimed item back, delayed; or to the dead letters, if it had its last delivery.

        If etcd does not answer, the claim's session deletes the claim once
        it does: the item is then available again at once, its delay and
        error unrecorded, but its delivery counted.

        Raises:
            ClaimLostError: The claim was gone; nothing was changed.
        """
        policy, candidate = item._policy, item._candidate
        with self._lock:
            # The item is older than any cached candidate: read afresh.
            self._candidates.pop(candidate.key.rpartition(b"/")[0], None)
        record = replace(candidate.record, error=error)
        try:
            if policy.max_deliveries is not None and record.deliveries >= policy.max_deliveries:
                moved = self._bury(
                    candidate,
                    policy,
                    reason=_too_many(record.deliveries, policy),
                    record=record,
                    holder=item,
                )
                if moved:
                    return
            else:
                delay = redelivery_delay(policy.redelivery_delay, record.deliveries)
                delayed = replace(record, retry_at=time.time() + delay if delay else None)
                committed = commit(
                    self._transport,
                    self._sessions.get,
                    compare=[item._holds()],
                    success=[
                        ops.delete(item.etcd_key),
                        ops.put(candidate.record_key, delayed.encode(), lease=candidate.lease),
                    ],
                    failure=[],
                )
                if committed.succeeded:
                    return
        except LeaseNotFoundError:
            pass  # the item's own lease expired: item and record are gone
        except EtcdPatternsError:
            item._session.abandon(Orphan(item.etcd_key, item.fencing_token))
            raise
        except BaseException:
            item._session.withdraw(Orphan(item.etcd_key, item.fencing_token))
            raise
        else:
            raise ClaimLostError(
                f"the claim on {item.key!r} expired before it was released; "
                "the item is available to other consumers"
            )
        item._session.withdraw(Orphan(item.etcd_key, item.fencing_token))

    def _let_go(self, item: ClaimedItem) -> None:
        """Make sure a claim whose ack failed does not outlive its purpose.

        The ack may have applied (the claim is gone with the item) or not
        (the item must be offered again): deleting the claim, if it is
        still this one, is right either way. The session does it once etcd
        answers, so the item is available again within a refresh interval
        of etcd's return, not held for as long as the process lives.
        """
        item._session.abandon(Orphan(item.etcd_key, item.fencing_token))

    def _bury(
        self,
        candidate: _Candidate,
        policy: _Policy,
        *,
        reason: str,
        record: _Record | None = None,
        holder: ClaimedItem | None = None,
    ) -> bool:
        """Move an item to the dead-letter queue, exactly once; whether this call moved it.

        The item keeps its id (so its priority and age) and its lease; its
        record goes with it, with the reason. Unclaimed items move only if
        unchanged and unclaimed; a claimed one only while ``holder`` holds it.
        """
        item_id = candidate.key.rpartition(b"/")[2]
        dead_key = policy.dead_letter + b"/" + item_id
        dead_record = self._records_prefix(policy.dead_letter) + item_id
        kept = replace(record or candidate.record, retry_at=None, reason=reason)
        compare = _unchanged_and_unclaimed(candidate) if holder is None else [holder._holds()]
        success = [
            ops.delete(candidate.key),
            ops.delete(candidate.record_key),
            ops.put(dead_key, candidate.value, lease=candidate.lease),
            ops.put(dead_record, kept.encode(), lease=candidate.lease),
        ]
        if holder is not None:
            success.append(ops.delete(holder.etcd_key))
        try:
            committed = commit(
                self._transport,
                self._sessions.get,
                compare=compare,
                success=success,
                failure=[],
            )
        except LeaseNotFoundError:
            if holder is not None:
                raise  # the releaser withdraws its claim
            return False  # the item's own lease expired: it is gone
        if committed.succeeded:
            log.info(
                "moved queue item %r to %r: %s",
                self._keyspace.decode(candidate.key),
                self._keyspace.decode(dead_key),
                reason,
            )
        return committed.succeeded

    # -- operators ----------------------------------------------------------

    def requeue(self, dead_dir: object, dir_key: object, *, max_items: object = None) -> int:
        """See `EtcdPatterns.requeue`."""
        source = self._keyspace.encode(dead_dir, name="dead_letter_dir")
        target = self._keyspace.encode(dir_key, name="dir_key")
        if source == target:
            raise InvalidArgumentError("dead_letter_dir and dir_key must be different queues")
        limit = None if max_items is None else check_count(max_items, name="max_items")
        moved = 0
        # Against consumers of the dead letters that keep taking items
        # first, the time of one request, as the batch calls have.
        deadline = Deadline(self._transport.timeout)
        while limit is None or moved < limit:
            wanted = REQUEUE_CHUNK if limit is None else min(REQUEUE_CHUNK, limit - moved)
            heads = self._read(source, wanted, everything=True)
            chosen = heads.candidates[:wanted]
            if not chosen:
                return moved
            # As many as one request carries: the first alone, if need be.
            values = [candidate.value for candidate in chosen]
            # Each moved item names nine keys: compared, deleted or put.
            chosen = chosen[: len(self._by_size(target, values, wanted, keys_per_item=9)[0])]
            target_records = self._records_prefix(target)
            compare = [c for candidate in chosen for c in _unchanged_and_unclaimed(candidate)]
            compare += [ops.compare_version(target, "==", 0)]
            success: list[Any] = []
            for candidate in chosen:
                item_id = candidate.key.rpartition(b"/")[2]
                compare.append(ops.compare_version(target + b"/" + item_id, "==", 0))
                success += [
                    ops.delete(candidate.key),
                    ops.delete(candidate.record_key),
                    ops.put(target + b"/" + item_id, candidate.value, lease=candidate.lease),
                    ops.delete(target_records + item_id),
                ]
            committed = commit(
                self._transport,
                self._sessions.get,
                compare=compare,
                success=success,
                failure=[ops.get(target, keys_only=True)],
            )
            if committed.succeeded:
                moved += len(chosen)
                deadline = Deadline(self._transport.timeout)
            elif committed.responses is not None and ops.kvs(committed.responses, 0):
                raise NotAValueError(self._keyspace.decode(target))
            elif deadline.expired():
                raise ConflictError(
                    f"requeue moved {moved} items, then other consumers of "
                    f"{self._keyspace.decode(source)!r} kept taking its items first"
                )
            # Otherwise a consumer of the dead letters took one first: read again.
        return moved

    def peek(self, dir_key: object, n: object = 10) -> list[QueuedItem]:
        """See `EtcdPatterns.peek`."""
        raw = self._keyspace.encode(dir_key, name="dir_key")
        count = check_count(n, name="n")
        # Every claim and record: those of later items may lie past any limit.
        responses, _ = self._read_raw(raw, count, sides=0)
        claimed = self._claimed(raw, responses)
        records = self._records(raw, responses)
        start = raw + b"/"
        shown: list[QueuedItem] = []
        for kv in ops.kvs(responses, 0):
            if not is_direct_child(raw, kv.key):
                continue
            item_id = kv.key[len(start) :]
            record = records.get(item_id, (0, _Record()))[1]
            parsed = parse_id(item_id)
            try:
                value: str | None = kv.value.decode("utf-8")
            except UnicodeDecodeError:
                value = None
            shown.append(
                QueuedItem(
                    key=self._keyspace.decode(kv.key),
                    value=value,
                    value_bytes=kv.value,
                    priority=None if parsed is None else parsed[0],
                    enqueued_at=None if parsed is None else parsed[1],
                    delivery_count=record.deliveries,
                    last_error=record.error,
                    claimed=item_id in claimed,
                    retry_at=record.retry_at,
                    reason=record.reason,
                )
            )
        return shown

    def stats(self, dir_key: object, *, dead_letter: object = None) -> QueueStats:
        """See `EtcdPatterns.queue_stats`."""
        raw = self._keyspace.encode(dir_key, name="dir_key")
        dead = self.policy(raw, dead_letter=dead_letter).dead_letter
        start, end = children_range(raw)
        dead_start, dead_end = children_range(dead)
        claims = self._claims_prefix(raw)
        records = self._records_prefix(raw)
        response = self._transport.txn(
            ops.txn(
                compare=[ops.compare_version(raw, ">", 0)],
                success=[ops.get(raw, keys_only=True)],
                failure=[
                    ops.get(start, end, keys_only=True),
                    ops.get(claims, prefix_end(claims), keys_only=True),
                    ops.get(records, prefix_end(records)),
                    ops.get(dead_start, dead_end, keys_only=True),
                ],
            ),
            write=False,
        )
        if response.succeeded:
            raise NotAValueError(self._keyspace.decode(raw))
        claimed = self._claimed(raw, response.responses)
        kept = self._records(raw, response.responses)
        now = time.time()
        pending: Counter[int] = Counter()
        in_flight = delayed = 0
        oldest: float | None = None
        for kv in ops.kvs(response.responses, 0):
            if not is_direct_child(raw, kv.key):
                continue
            item_id = kv.key[len(start) :]
            if item_id in claimed:
                in_flight += 1
                continue
            parsed = parse_id(item_id)
            pending[0 if parsed is None else parsed[0]] += 1
            retry_at = kept.get(item_id, (0, _Record()))[1].retry_at
            if retry_at is not None and retry_at > now:
                delayed += 1
            if parsed is not None:
                oldest = parsed[1] if oldest is None else min(oldest, parsed[1])
        dead_letters = sum(is_direct_child(dead, kv.key) for kv in ops.kvs(response.responses, 3))
        return QueueStats(
            pending=dict(sorted(pending.items())),
            in_flight=in_flight,
            delayed=delayed,
            oldest_age=None if oldest is None else max(0.0, now - oldest),
            dead_letters=dead_letters,
            revision=response.header.revision,
        )

    # -- machinery ----------------------------------------------------------

    def _candidates_until(
        self, raw: bytes, deadline: Deadline, policy: _Policy, tidy: Deadline
    ) -> Iterator[_Candidate]:
        """Yield deliverable candidate heads, first served first, waiting when there are none.

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
                    raise _outrun(self._keyspace.decode(raw))
                if not self._deliverable(cached[0], policy, tidy):
                    # Moved aside, which is no race lost; or skipped, once
                    # moving them aside took all the time there was.
                    offered = offered or tidy.expired()
                    continue
                offered = True
                yield cached[0]
                continue
            self._cache(raw, self._wait_for_heads(raw, self._prefetch, deadline).candidates)

    def _cached_heads(self, raw: bytes, wanted: int) -> _Heads | None:
        """``wanted`` cached heads, if that many are cached; else None, and the cache is emptied."""
        with self._lock:
            cached = self._candidates.pop(raw, None)
            if cached is None or len(cached) < wanted:
                return None
            chosen = [cached.popleft() for _ in range(wanted)]
            self._candidates[raw] = cached
        return _Heads(chosen, 0, None, complete=False)

    def _cache(self, raw: bytes, candidates: list[_Candidate]) -> None:
        with self._lock:
            self._candidates[raw] = deque(candidates)

    def _wait_for_heads(self, raw: bytes, wanted: int, deadline: Deadline) -> _Heads:
        """Read up to ``wanted`` heads, waiting until there is at least one."""
        return wait(
            self._transport,
            self._read(raw, wanted),
            read=lambda: self._read(raw, wanted),
            watch=lambda heads: None if heads.candidates else self._arrivals(raw, heads),
            deadline=deadline,
            timeout_error=lambda: QueueEmptyError(
                f"queue {self._keyspace.decode(raw)!r} stayed empty"
            ),
        )

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

    def _records_prefix(self, raw: bytes) -> bytes:
        return self._keyspace.internal("deliveries", raw.hex()) + b"/"

    def _read_ops(
        self, raw: bytes, limit: int, *, head: bytes = b"", sides: int | None = None
    ) -> list[Any]:
        """The ranges that show a queue's first ``limit`` items, with their claims and records.

        Claims and records are named after their items, so they sort as the
        items do: the first ``limit`` of each cover the items read, and a
        read costs the same however many items are in flight or delayed
        behind them. (`_heads` sets aside an item whose claim or record
        might lie past a range cut short.) With ``head``, an item id, every
        range starts there: claims and records left before the first item
        (by another tool's deletes) then take no room. ``sides`` limits the
        claims and records ranges otherwise; 0 reads them whole.
        """
        side_limit = limit if sides is None else sides
        start, end = children_range(raw)
        claims = self._claims_prefix(raw)
        records = self._records_prefix(raw)
        return [
            ops.get(start + head, end, limit=limit),
            ops.get(claims + head, prefix_end(claims), keys_only=True, limit=side_limit),
            ops.get(records + head, prefix_end(records), limit=side_limit),
        ]

    def _read_raw(
        self, raw: bytes, limit: int, *, head: bytes = b"", sides: int | None = None
    ) -> tuple[Sequence[Any], int]:
        """The responses of `_read_ops`, and their revision.

        Raises:
            NotAValueError: ``raw`` holds a value of its own.
        """
        response = self._transport.txn(
            ops.txn(
                compare=[ops.compare_version(raw, ">", 0)],
                success=[ops.get(raw, keys_only=True)],
                failure=self._read_ops(raw, limit, head=head, sides=sides),
            ),
            write=False,
        )
        if response.succeeded:
            raise NotAValueError(self._keyspace.decode(raw))
        revision: int = response.header.revision
        return response.responses, revision

    def _read(self, raw: bytes, wanted: int, *, everything: bool = False) -> _Heads:
        """Up to ``wanted`` available items, first served first.

        With ``everything``, items held back by a redelivery delay count as
        available too.
        """
        responses, revision = self._read_raw(raw, wanted)
        heads = self._heads(raw, responses, revision, wanted, everything=everything)
        # Deeper keys, claimed and delayed items count against the limit:
        # if they hid every item, look further once.
        found = ops.kvs(responses, 0)
        if heads.candidates or heads.complete or wanted >= FAR or not found:
            return heads
        head = found[0].key[len(raw) + 1 :]
        responses, revision = self._read_raw(raw, FAR, head=head)
        return self._heads(raw, responses, revision, wanted, everything=everything)

    def _claimed(self, raw: bytes, responses: Sequence[Any]) -> set[bytes]:
        claims = self._claims_prefix(raw)
        return {kv.key[len(claims) :] for kv in ops.kvs(responses, 1)}

    def _records(self, raw: bytes, responses: Sequence[Any]) -> dict[bytes, tuple[int, _Record]]:
        records = self._records_prefix(raw)
        return {
            kv.key[len(records) :]: (kv.mod_revision, _Record.decode(kv.value))
            for kv in ops.kvs(responses, 2)
        }

    def _heads(
        self,
        raw: bytes,
        responses: Sequence[Any],
        revision: int,
        wanted: int,
        *,
        everything: bool = False,
    ) -> _Heads:
        """The available items in the responses of `_read_ops`."""
        start = raw + b"/"
        found = ops.kvs(responses, 0)
        complete = not responses[0].response_range.more
        claimed = self._claimed(raw, responses)
        records = self._records(raw, responses)
        claims, record_keys = self._claims_prefix(raw), self._records_prefix(raw)
        # Past the last claim or record of a range cut short, an item's
        # claim or record is unknown: such items are set aside.
        known_to = min(
            (
                ops.kvs(responses, index)[-1].key[len(prefix) :]
                for index, prefix in ((1, claims), (2, record_keys))
                if responses[index].response_range.more
            ),
            default=None,
        )
        now = time.time()
        retry_at: float | None = None
        candidates: list[_Candidate] = []
        for kv in found:
            item_id = kv.key[len(start) :]
            if known_to is not None and item_id > known_to:
                complete = False
                break
            if not is_direct_child(raw, kv.key) or item_id in claimed:
                continue
            record_mod, record = records.get(item_id, (0, _Record()))
            if record.retry_at is not None and record.retry_at > now and not everything:
                retry_at = record.retry_at if retry_at is None else min(retry_at, record.retry_at)
                continue
            candidates.append(
                _Candidate(
                    key=kv.key,
                    value=kv.value,
                    mod_revision=kv.mod_revision,
                    lease=kv.lease,
                    claim=claims + item_id,
                    record_key=record_keys + item_id,
                    record_mod=record_mod,
                    record=record,
                )
            )
        return _Heads(candidates[:wanted], revision, retry_at, complete)

    def _arrivals(self, raw: bytes, heads: _Heads) -> Watch:
        """What a consumer with nothing to take watches: an item put, or a claim gone.

        It also reads again when the first delayed item it saw is due.
        """
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

        due = None if heads.retry_at is None else max(0.0, heads.retry_at - time.time())
        return Watch(creates, accept, due)


def _outrun(name: str) -> QueueEmptyError:
    return QueueEmptyError(
        f"queue {name!r}: other consumers took every item first until the timeout "
        "(or every item left was undeliverable)"
    )


def _nest(levels: Sequence[tuple[list[Any], list[Any]]], innermost: list[Any]) -> list[Any]:
    """One transaction per level, each trying the next in its failure branch.

    Args:
        levels: The compares and success operations of each level, first
            tried first.
        innermost: The operations of the last level's failure branch.
    """
    step = innermost
    for compare, success in reversed(levels):
        step = [ops.nested(compare=compare, success=success, failure=step)]
    return step


def _which_level(responses: Sequence[Any], levels: int) -> tuple[int | None, Any]:
    """Which level of `_nest`'s transactions applied its success branch, and its response.

    None, and the innermost transaction's response, if none did.
    """
    response = responses[0].response_txn
    for index in range(levels):
        if response.succeeded:
            return index, response
        if index < levels - 1:
            response = response.responses[0].response_txn
    return None, response


def _too_many(deliveries: int, policy: _Policy) -> str:
    return f"delivered {deliveries} times, and max_deliveries is {policy.max_deliveries}"


def _decodes(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _unchanged_and_unclaimed(candidate: _Candidate, *, record: bool = True) -> list[Any]:
    """The compares that the item is as read, and unclaimed.

    Args:
        candidate: The item, as read.
        record: Whether its delivery record must be as read, too: a claim
            counts from it. A take needs not: the record goes with the
            item, and a record that changed since the read (a claim given
            back meanwhile) only means the item is taken before its
            redelivery delay ends, within one read's staleness.
    """
    same = [
        ops.compare_mod(candidate.key, "==", candidate.mod_revision),
        ops.compare_version(candidate.claim, "==", 0),
    ]
    if record:
        same.append(ops.compare_mod(candidate.record_key, "==", candidate.record_mod))
    return same


class Claim:
    """Context manager of `EtcdPatterns.claim`: acks on success, releases on error.

    An item acked or released explicitly inside the block is left alone on
    exit.
    """

    def __init__(
        self,
        queue: Queue,
        raw: bytes,
        lease_ttl: int | None,
        deadline: Deadline,
        policy: _Policy,
        *,
        tidy: Deadline,
    ) -> None:
        self._queue = queue
        self._raw = raw
        self._lease_ttl = lease_ttl
        self._deadline = deadline
        self._policy = policy
        self._tidy = tidy
        self._item: ClaimedItem | None = None

    def __enter__(self) -> ClaimedItem:
        self._item = self._queue._claim_one(
            self._raw, self._lease_ttl, self._deadline, self._policy, self._tidy
        )
        return self._item

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        item, self._item = self._item, None
        if item is None or item._settled is not None:
            return
        if exc is not None:
            try:
                item.release(exc)
            except EtcdPatternsError as failure:
                # The block's own error is the one to see; the item is
                # available again once its claim goes.
                exc.add_note(f"releasing the claimed item failed too: {failure!r}")
            return
        item.ack()
