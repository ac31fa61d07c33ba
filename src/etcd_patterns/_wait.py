"""Waiting for etcd to change: the one wait loop that every pattern uses.

Protocol, the shape of etcd's ``waitDeletes``:

1. Read the state waited on, in one round trip, at some revision.
2. If the caller's ``watch`` says the state is final, return it.
3. Otherwise watch only the keys ``watch`` names (a lock waiter: its
   predecessor; a consumer: the queue's items and claims), until an event
   that ``watch`` accepts, the deadline, or `RECHECK_INTERVAL`.
4. Read again, and go back to 2.

The watches start at the current revision rather than at the read's: a
watch that starts in the past is served from etcd's history, which etcd
replays only every 100 ms, and a lock handoff must not wait for that. To
miss nothing between the read and the watches, the state is read again once
the watches exist, if etcd's revision moved past the read's; if that read
names other keys to watch, or none, it is used at once.

A caller whose keys are unlikely to change soon (a lock waiter far back in
the queue, whose predecessor must win and leave first) asks for ``replay``
instead: each key is watched twice on the one stream, from the current
revision and from the read's, and no read follows. The second watch sees
whatever changed between the read and the first, late but never missed.

Guarantees:

* Nothing is missed: every change after a read is either seen by the watch
  or by the read that follows its creation.
* No herd: a waiter watches only the keys its state names, so one change
  wakes only the waiters that care about it.
* Bounded: the deadline is checked before every watch, and a watch never
  outlives it; the wait then ends with at most one more read, itself
  bounded by the instance's timeout. A watch that silently stopped
  delivering (a member that hangs, a cut stream) costs at most
  `RECHECK_INTERVAL` before a fresh read (less when ``watch`` names a
  time at which the state changes by the clock alone), and streams that fail at once
  are retried with a growing pause (50 ms, doubling to 1 s), not in a spin.
* A refused watch is an error, not a spin: etcd refuses a watch by creating
  and cancelling it at once, saying "permission denied", or "invalid auth
  token" when the token had expired. The read that follows at once renews
  the token, or raises `PermissionDeniedError` itself; a watch refused again
  after a read that etcd allowed raises `PermissionDeniedError`.

Cost: one watch stream and one read per wake-up, plus one read per watch
when etcd moved on between the read and the watch, unless ``replay``.

Lease loss: the loop knows nothing of leases. A caller that must stop
waiting when its session is lost says so in ``watch``, by returning None.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

from etcd3 import etcdrpc

from ._errors import PermissionDeniedError
from ._keys import children_range, is_direct_child
from ._retry import Deadline
from ._transport import Transport

# A waiter reads again at least this often, whatever its watch says, so that
# no wait can hang on a watch that silently stopped.
RECHECK_INTERVAL = 5.0

# How etcd says why it cancelled a watch that it refused: the role may not
# read the keys, or (etcd 3.4) the auth token had expired.
_REFUSALS = ("permission denied", "invalid auth token")
# How long to pause after a watch stream that failed before watching; the
# pause doubles while streams keep failing, up to the maximum.
_BROKEN_PAUSE = 0.05
_BROKEN_PAUSE_MAX = 1.0


class Observed(Protocol):
    """A state read from etcd, and the revision the read reflects."""

    @property
    def revision(self) -> int: ...


S = TypeVar("S", bound=Observed)
V = TypeVar("V")


class Watch(NamedTuple):
    """What a waiter watches, and which events end the wait.

    Attributes:
        creates: One `WatchCreateRequest` per key or range, without a start
            revision.
        accept: Whether an event may have changed the state waited on.
        recheck: Read again after at most this many seconds, whatever the
            watch says: the state will change by the clock alone then (a
            queue item's redelivery delay ends). None for no such time.
        replay: Watch each key from the read's revision as well, in place
            of a read when etcd moved on before the watches began. A change
            in between then ends the wait only once etcd replays its
            history, up to 100 ms late: for keys unlikely to change soon.
    """

    creates: Sequence[Any]
    accept: Callable[[Any], bool]
    recheck: float | None = None
    replay: bool = False


def wait(
    transport: Transport,
    state: S,
    *,
    read: Callable[[], S],
    watch: Callable[[S], Watch | None],
    deadline: Deadline,
    timeout_error: Callable[[], Exception],
) -> S:
    """Wait until ``watch(state)`` is None, and return that state.

    Args:
        transport: Sends the reads' requests and opens the watches.
        state: The state from the caller's latest read.
        read: Reads the state afresh, in one round trip.
        watch: What to watch for a state; None once it is final. It may
            raise, to end the wait with an error.
        deadline: When to give up.
        timeout_error: The error to raise when the deadline passes.

    Raises:
        PermissionDeniedError: etcd refused the watch twice, the second time
            after a read it allowed.
    """
    refused: str | None = None
    pause = _BROKEN_PAUSE
    while (waiting := watch(state)) is not None:
        remaining = deadline.remaining()
        if remaining == 0:
            raise timeout_error()
        window = min(
            [RECHECK_INTERVAL, *(t for t in (remaining, waiting.recheck) if t is not None)]
        )
        outcome = _watch_once(transport, waiting, state, window=window, read=read, watch=watch)
        if isinstance(outcome, _Refused):
            if refused is not None:
                raise PermissionDeniedError(
                    f"etcd at {','.join(transport.endpoints)} refused to watch what it "
                    f"allows to be read: {outcome.reason}"
                )
            refused = outcome.reason
            state = read()
            continue
        refused = None
        if isinstance(outcome, _Broken):
            # The stream failed before it watched anything (a member that
            # serves reads but not watches, or is overloaded): back off, so
            # that a stream that keeps failing at once is not a spin.
            left = deadline.remaining()
            time.sleep(pause if left is None else min(pause, left))
            pause = min(2 * pause, _BROKEN_PAUSE_MAX)
            outcome = None
        else:
            pause = _BROKEN_PAUSE
        state = read() if outcome is None else outcome
    return state


def children_watch(raw: bytes, *, itself: bool) -> Watch:
    """A watch on the direct children of ``raw`` and, if ``itself``, on ``raw``."""
    start, end = children_range(raw)
    creates = [etcdrpc.WatchCreateRequest(key=start, range_end=end)]
    if itself:
        creates.append(etcdrpc.WatchCreateRequest(key=raw))

    def accept(event: Any) -> bool:
        key: bytes = event.kv.key
        return (itself and key == raw) or (key != raw and is_direct_child(raw, key))

    return Watch(creates, accept)


def changes(
    transport: Transport,
    read: Callable[[], S],
    *,
    view: Callable[[S], V],
    watch: Callable[[S], Watch],
    timeout: float | None,
    timeout_error: Callable[[], Exception],
) -> Generator[V, None, None]:
    """What ``view`` shows of the state now, then each time it shows something else.

    Each value yielded comes from one read, so it is a state that etcd
    held; changes in between may coalesce, but the latest one is never
    missed: the wait loop reads again whenever etcd moved on before its
    watch began, whenever the watch breaks (failover, compaction), and at
    least every `RECHECK_INTERVAL`.

    Args:
        transport: Sends the reads and opens the watches.
        read: Reads the state, in one round trip.
        view: What the caller sees of a state; equal views are not yielded
            twice in a row.
        watch: What to watch while the view is unchanged.
        timeout: How long to wait for each next change; None waits forever.
        timeout_error: Raised, from the iterator, when that time passes.
    """
    state = read()
    seen = view(state)
    yield seen
    while True:

        def unchanged(state: S, seen: V = seen) -> Watch | None:
            return watch(state) if view(state) == seen else None

        state = wait(
            transport,
            state,
            read=read,
            watch=unchanged,
            deadline=Deadline(timeout),
            timeout_error=timeout_error,
        )
        seen = view(state)
        yield seen


class _Refused(NamedTuple):
    reason: str


class _Broken:
    """A watch stream that ended before it watched anything."""


_BROKEN = _Broken()


def _watch_once(
    transport: Transport,
    waiting: Watch,
    state: S,
    *,
    window: float,
    read: Callable[[], S],
    watch: Callable[[S], Watch | None],
) -> S | _Refused | _Broken | None:
    """One watch stream: a fresher state, a refusal, or None to read again.

    `_BROKEN` if the stream ended before every watch was created.
    """
    creates = list(waiting.creates)
    if waiting.replay:
        creates += [_since(create, state.revision + 1) for create in waiting.creates]
    created = 0
    with contextlib.closing(transport.watch(creates, timeout=window)) as responses:
        for response in responses:
            if response.canceled:
                if any(refusal in response.cancel_reason for refusal in _REFUSALS):
                    return _Refused(response.cancel_reason)
                return None if created == len(creates) else _BROKEN
            if response.compact_revision:
                return None
            if response.created:
                created += 1
                if (
                    created == len(creates)
                    and not waiting.replay
                    and response.header.revision > state.revision
                ):
                    # etcd moved on between the read and the watches.
                    fresh = read()
                    now = watch(fresh)
                    if now is None or list(now.creates) != list(waiting.creates):
                        return fresh
                    state = fresh
                continue
            if any(waiting.accept(event) for event in response.events):
                return None
    return None if created == len(creates) else _BROKEN


def _since(create: Any, revision: int) -> Any:
    """A copy of a `WatchCreateRequest` that starts at ``revision``."""
    replay = etcdrpc.WatchCreateRequest()
    replay.CopyFrom(create)
    replay.start_revision = revision
    return replay
