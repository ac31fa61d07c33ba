"""Client processes that exercise one pattern each and record every operation.

Each runs in its own (spawned) process against the proxied endpoints until
``stop`` is set. Each kind of call has its own bound on time, from the
instance's `TIMEOUT` (one request, settling included), each call's own
`OP_TIMEOUT` and the session's `CLEANUP_TIMEOUT`; see `BOUNDS`.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from etcd_patterns import (
    EtcdPatterns,
    EtcdPatternsError,
    LeadershipLostError,
    LockLostError,
    OutcomeUnknownError,
)
from etcd_patterns._members import Roster
from etcd_patterns._partition import Partition
from etcd_patterns._queue import CHUNK
from etcd_patterns._session import CLEANUP_TIMEOUT
from tests.nemesis.history import OK, Op, Recorder

TIMEOUT = 2.0  # the instance's: one request
OP_TIMEOUT = 3.0  # each call's own
SESSION_TTL = 3
# The longest each call may take: its own wait, plus the requests it makes
# around the wait, each bounded by TIMEOUT.
BOUNDS = {
    # a first read, a last attempt begun just before the deadline, a lease grant
    "incr": OP_TIMEOUT + 3 * TIMEOUT,
    # a lease grant, the registration, a last turn read; a waiter that gives
    # up withdraws its key
    "acquire": OP_TIMEOUT + 3 * TIMEOUT + CLEANUP_TIMEOUT,
    # a lease grant, the write
    "enqueue": 2 * TIMEOUT,
    # a lease grant, a read, a take; dequeue_many's follow-up takes get one
    # more; moving an undeliverable item aside, begun just before the deadline
    "dequeue": OP_TIMEOUT + 5 * TIMEOUT,
    # as dequeue, then the ack, or the release of the claim
    "claim": OP_TIMEOUT + 5 * TIMEOUT + CLEANUP_TIMEOUT,
    # as acquire
    "campaign": OP_TIMEOUT + 3 * TIMEOUT + CLEANUP_TIMEOUT,
    # as acquire, and one more registration when the limit's record is not
    # the one expected
    "permit": OP_TIMEOUT + 4 * TIMEOUT + CLEANUP_TIMEOUT,
    # the wait for a change, a read when etcd moved on before the watch, the last read
    "observe": OP_TIMEOUT + 2 * TIMEOUT,
    # a lease grant, reads, the registration, the ready key, the last read,
    # and a withdrawal
    "enter": OP_TIMEOUT + 5 * TIMEOUT + CLEANUP_TIMEOUT,
    # saying so, the round's end, the last read, and a withdrawal
    "leave": OP_TIMEOUT + 4 * TIMEOUT,
    # a lease grant, the join, settling a lost answer
    "join": 3 * TIMEOUT,
    # the wait for a change, a read when etcd moved on before the watch, the last read
    "share": OP_TIMEOUT + 2 * TIMEOUT,
    # deleting the member's key, settling a lost answer
    "part": 2 * TIMEOUT,
}
NAMESPACE = "/nemesis/"
SEMAPHORE_LIMIT = 2
PARTICIPANTS = 3
# The partitioner's group and items.
GROUP = "G"
ITEMS = [f"item-{n}" for n in range(60)]
# A roster watcher, once stopped, follows on until the group is empty and
# quiet for OP_TIMEOUT, or for this long at most.
FOLLOW_ON = 30.0


def _connect(endpoints: list[str]) -> EtcdPatterns:
    return EtcdPatterns.connect(
        endpoints, namespace=NAMESPACE, timeout=TIMEOUT, session_ttl=SESSION_TTL
    )


def _incr(value: str) -> str:
    return str(int(value) + 1)


def counter(endpoints: list[str], out: str, name: str, stop: Any) -> None:
    """Increment one counter, as fast as it goes."""
    recorder = Recorder(Path(out), name)
    with _connect(endpoints) as etcd:
        while not stop.is_set():
            with recorder.op("incr", bound=BOUNDS["incr"]):
                etcd.transform("counter", _incr, default="0", timeout=OP_TIMEOUT)
    recorder.close()


def watcher(endpoints: list[str], out: str, name: str, stop: Any) -> None:
    """Follow the counter with `watch_values`, recording each state yielded.

    A watch that fails is opened again. Once ``stop`` is set, it follows on
    until no change comes for `OP_TIMEOUT`: its last state must then be
    the counter's final value.
    """
    recorder = Recorder(Path(out), name)
    with _connect(endpoints) as etcd:
        for stream in itertools.count():
            states = etcd.watch_values("counter", timeout=OP_TIMEOUT)
            with contextlib.closing(states):
                while True:
                    stopping = stop.is_set()
                    with recorder.op("watch", bound=BOUNDS["observe"]) as op:
                        op.info["stream"], op.info["stopping"] = stream, stopping
                        values = next(states)
                        op.value = int(values[0]) if values else 0
                    if op.outcome != OK:
                        break  # a watch that raised is over: open another
            if op.outcome != OK and stopping and op.error == "WatchTimeoutError":
                break
    recorder.close()


def lock(endpoints: list[str], out: str, name: str, stop: Any) -> None:
    """Take the lock; in each section, write the fencing token to a register, guarded."""
    recorder = Recorder(Path(out), name)
    with _connect(endpoints) as etcd:
        while not stop.is_set():
            _section(
                etcd,
                recorder,
                name,
                etcd.locked("L", timeout=OP_TIMEOUT),
                kind="acquire",
                lost_error=LockLostError,
            )
    recorder.close()


def candidate(endpoints: list[str], out: str, name: str, stop: Any) -> None:
    """Campaign; while leading, proclaim the fencing token, and write it to a register, guarded."""
    recorder = Recorder(Path(out), name)
    with _connect(endpoints) as etcd:
        while not stop.is_set():
            _section(
                etcd,
                recorder,
                name,
                etcd.elected("E", name, timeout=OP_TIMEOUT),
                kind="campaign",
                lost_error=LeadershipLostError,
                proclaim=True,
            )
    recorder.close()


def permit_holder(endpoints: list[str], out: str, name: str, stop: Any) -> None:
    """Take one of `SEMAPHORE_LIMIT` permits, again and again."""
    recorder = Recorder(Path(out), name)
    with _connect(endpoints) as etcd:
        while not stop.is_set():
            _section(
                etcd,
                recorder,
                name,
                etcd.semaphore("S", SEMAPHORE_LIMIT, timeout=OP_TIMEOUT),
                kind="permit",
                lost_error=LockLostError,
                register=False,  # holders overlap: their writes have no order
            )
    recorder.close()


def rw_reader(endpoints: list[str], out: str, name: str, stop: Any) -> None:
    """Hold the read-write lock as a reader, again and again."""
    _rw(endpoints, out, name, stop, "read")


def rw_writer(endpoints: list[str], out: str, name: str, stop: Any) -> None:
    """Hold the read-write lock as its writer, again and again."""
    _rw(endpoints, out, name, stop, "write")


def _rw(endpoints: list[str], out: str, name: str, stop: Any, mode: str) -> None:
    recorder = Recorder(Path(out), name)
    with _connect(endpoints) as etcd:
        holding = etcd.read_locked if mode == "read" else etcd.write_locked
        while not stop.is_set():
            _section(
                etcd,
                recorder,
                name,
                holding("RW", timeout=OP_TIMEOUT),
                kind="acquire",
                lost_error=LockLostError,
                register=False,  # readers overlap: their writes have no order
                mode=mode,
            )
    recorder.close()


def participant(endpoints: list[str], out: str, name: str, stop: Any) -> None:
    """Take part in round after round of a double barrier of `PARTICIPANTS`."""
    recorder = Recorder(Path(out), name)
    with _connect(endpoints) as etcd:
        while not stop.is_set():
            barrier = etcd.double_barrier("DB", PARTICIPANTS, timeout=OP_TIMEOUT)
            with recorder.op("enter", bound=BOUNDS["enter"]) as op:
                taking_part = barrier.__enter__()
            if op.outcome != OK:
                continue
            began = time.monotonic()
            time.sleep(random.Random(taking_part.round).uniform(0, 0.02))  # the round's work
            ended = time.monotonic()
            with recorder.op("leave", bound=BOUNDS["leave"]) as op:
                op.info["round"] = taking_part.round
                barrier.__exit__(None, None, None)
            info = {"round": taking_part.round, "left": op.outcome == OK}
            recorder.record(Op(name, "round", began, ended, info=info))
    recorder.close()


def _section(
    etcd: EtcdPatterns,
    recorder: Recorder,
    name: str,
    holding: Any,
    *,
    kind: str,
    lost_error: type[EtcdPatternsError],
    proclaim: bool = False,
    register: bool = True,
    mode: str = "",
) -> None:
    """Hold a fence once, recorded as a "section" op.

    In it, a guarded write of its token to a register, unless ``register``
    is False, and a proclamation of it if ``proclaim``.
    """
    with recorder.op(kind, bound=BOUNDS[kind]) as op:
        fence = holding.__enter__()
    if op.outcome != OK:
        return
    began = time.monotonic()
    token, previous, lost = fence.fencing_token, None, False
    seen: list[int] = []

    def write(value: str) -> str:
        seen.append(int(value))
        return str(token)

    try:
        if proclaim:
            # Observers check that a leader's value names the leader's token.
            fence.proclaim(f"{name}:{token}")
        if register:
            etcd.transform("register", write, default="0", guard=fence, timeout=OP_TIMEOUT)
            previous = seen[-1]
    except lost_error:
        lost = True
    except EtcdPatternsError:
        pass  # not written, or not known to be: nothing to check
    time.sleep(random.Random(token).uniform(0, 0.02))  # the section's own work
    ended = time.monotonic()
    lost = lost or fence.lost.is_set()
    try:
        holding.__exit__(None, None, None)
    except lost_error:
        lost = True
    except EtcdPatternsError:
        pass
    info = {"token": token, "previous": previous, "lost": lost}
    if mode:
        info["mode"] = mode
    recorder.record(Op(name, "section", began, ended, info=info))


def observer(endpoints: list[str], out: str, name: str, stop: Any) -> None:
    """Follow the election's leader, recording each state seen."""
    recorder = Recorder(Path(out), name)
    with _connect(endpoints) as etcd:
        while not stop.is_set():
            changes = etcd.observe("E", timeout=OP_TIMEOUT)
            while not stop.is_set():
                with recorder.op("observe", bound=BOUNDS["observe"]) as op:
                    info = next(changes)
                    op.value = None if info is None else info.value
                    op.info["token"] = None if info is None else info.fencing_token
                if op.outcome != OK:
                    break  # a timeout, or etcd away: observe afresh
    recorder.close()


def producer(endpoints: list[str], out: str, name: str, stop: Any) -> None:
    """Enqueue numbered items, each named after this producer and its priority.

    Items of one priority are served in enqueue order: ``<name>/p<priority>``
    is the "producer" whose order each consumer must see.
    """
    recorder = Recorder(Path(out), name)
    chance = random.Random(name)
    with _connect(endpoints) as etcd:
        for number in itertools.count():
            if stop.is_set():
                break
            priority = chance.choice(PRIORITIES)
            value = f"{name}/p{priority}:{number}"
            with recorder.op("enqueue", value=value, bound=BOUNDS["enqueue"]):
                etcd.enqueue("q", value, priority=priority)
    recorder.close()


# The priorities that producers pick from.
PRIORITIES = (-1, 0, 0, 1)
# More than one transaction takes, so that a batch often takes twice.
BATCH = CHUNK + 8
# Claimers give back this share of their items, and allow this many
# deliveries: some items are due one more, and go to the dead letters.
RELEASED = 0.25
MAX_DELIVERIES = 3


def consumer(endpoints: list[str], out: str, name: str, stop: Any) -> None:
    """Dequeue items, one at a time or in batches."""
    recorder = Recorder(Path(out), name)
    chance = random.Random(name)
    with _connect(endpoints) as etcd:
        while not stop.is_set():
            with recorder.op("dequeue", bound=BOUNDS["dequeue"]) as op:
                if chance.random() < 0.2:
                    op.value = etcd.dequeue_many("q", BATCH, timeout=OP_TIMEOUT)
                else:
                    op.value = etcd.dequeue("q", timeout=OP_TIMEOUT)
    recorder.close()


def claimer(endpoints: list[str], out: str, name: str, stop: Any) -> None:
    """Claim items; ack most, give some back, so that some go to the dead letters."""
    recorder = Recorder(Path(out), name)
    chance = random.Random(name)
    with _connect(endpoints) as etcd:
        while not stop.is_set():
            claim_one(etcd, recorder, release=chance.random() < RELEASED)
    recorder.close()


def claim_one(
    etcd: EtcdPatterns, recorder: Recorder, *, release: bool, timeout: float = OP_TIMEOUT
) -> bool:
    """Claim one item and ack it (or give it back); whether there was one."""
    # A short redelivery delay: released items come back within the run.
    claiming = etcd.claim(
        "q", timeout=timeout, max_deliveries=MAX_DELIVERIES, redelivery_delay=0.05
    )
    with recorder.op("claim", bound=BOUNDS["claim"]) as op:
        item = claiming.__enter__()
        op.value, op.info["token"] = item.value, item.fencing_token
        op.info["deliveries"] = item.delivery_count
        if release:
            claiming.__exit__(RuntimeError, RuntimeError("given back"), None)
            op.info["ended"] = "released"
            return True
        try:
            claiming.__exit__(None, None, None)
            op.info["ended"] = "acked"
        except OutcomeUnknownError:
            op.info["ended"] = "unknown"
        except LockLostError:  # pragma: no cover - not raised by claims
            raise
        except EtcdPatternsError as exc:
            # ClaimLostError: another may have it. Unavailable: not acked,
            # and the claim is let go.
            op.info["ended"] = "lost" if type(exc).__name__ == "ClaimLostError" else "released"
    return op.value is not None


def partition_member(endpoints: list[str], out: str, name: str, stop: Any) -> None:
    """Join the partitioner's group, follow this member's share for a while, leave; again.

    Each share is recorded with the membership read it comes from (its
    revision and the create revision of every member's key), computed by
    the same read, wait loop and share as `Partition.changes`, which
    yields the share alone. Each stay in the group is a "member" op, from
    the join's return to the leave's call (or to when etcd last confirmed
    the member's lease, if earlier), with the member's token and whether a
    loss was reported.
    """
    recorder = Recorder(Path(out), name)
    chance = random.Random(name)
    with _connect(endpoints) as etcd:
        for stream in itertools.count():
            if stop.is_set():
                break
            joining = etcd.partitioner(GROUP, name, ITEMS)
            with recorder.op("join", bound=BOUNDS["join"]) as op:
                part = joining.__enter__()
                op.info["token"] = part.member.fencing_token
            if op.outcome != OK:
                continue
            began, lost = time.monotonic(), False
            stay = chance.uniform(0.2, 1.0)
            until = began + stay
            follow = part._groups.follow(part._raw, view=_with_share(part), timeout=stay)
            with contextlib.closing(follow):
                while time.monotonic() < until and not stop.is_set():
                    with recorder.op("share", bound=BOUNDS["share"]) as op:
                        roster, owned = next(follow)
                        op.info.update(
                            stream=stream,
                            revision=roster.revision,
                            created=roster.created,
                            owned=owned,
                            token=part.member.fencing_token,
                        )
                    if op.error == "MembershipLostError":
                        lost = True
                    if op.outcome != OK:
                        break  # quiet, lost, or etcd away: this stay ends
            # Past the time etcd last confirmed its lease, a member cut off
            # may be gone without knowing: its stay is not known beyond it.
            ended = min(time.monotonic(), part.member.confirmed_until)
            with recorder.op("part", bound=BOUNDS["part"]) as op:
                joining.__exit__(None, None, None)
            lost = lost or op.error == "MembershipLostError"
            info = {"token": part.member.fencing_token, "lost": lost}
            recorder.record(Op(name, "member", began, ended, info=info))
    recorder.close()


def _with_share(part: Partition) -> Callable[[Roster], tuple[Roster, list[str]]]:
    return lambda roster: (roster, part._share(roster))


def roster_watcher(endpoints: list[str], out: str, name: str, stop: Any) -> None:
    """Follow the partitioner's group as `watch_members` does, recording each roster.

    Once ``stop`` is set, it follows on until it has seen the group empty
    and then no change for `OP_TIMEOUT`, or for `FOLLOW_ON` at most: its
    last roster must then be the group's final state.
    """
    recorder = Recorder(Path(out), name)
    with _connect(endpoints) as etcd:
        raw = etcd._keyspace.encode(GROUP, name="group")
        deadline, empty = None, False
        for stream in itertools.count():
            rosters = etcd._groups.follow(raw, view=lambda roster: roster, timeout=OP_TIMEOUT)
            with contextlib.closing(rosters):
                while deadline is None or time.monotonic() < deadline:
                    if stop.is_set() and deadline is None:
                        deadline = time.monotonic() + FOLLOW_ON
                    with recorder.op("roster", bound=BOUNDS["observe"]) as op:
                        roster = next(rosters)
                        op.info.update(
                            stream=stream, revision=roster.revision, created=roster.created
                        )
                    if op.outcome == OK:
                        empty = not roster.created
                    if op.outcome != OK:
                        break  # a watch that raised is over: open another
            if deadline is not None and (
                time.monotonic() > deadline or (empty and op.error == "WatchTimeoutError")
            ):
                break
    recorder.close()


WORKLOADS: dict[str, list[Any]] = {
    "counter": [counter, counter, watcher, watcher],
    "lock": [lock, lock, lock],
    "election": [candidate, candidate, candidate, observer],
    "semaphore": [permit_holder] * 4,
    "rwlock": [rw_reader, rw_reader, rw_reader, rw_writer, rw_writer],
    "barrier": [participant] * PARTICIPANTS,
    "queue": [producer, producer, consumer, consumer, consumer, consumer],
    "claims": [producer, producer, claimer, claimer, claimer, claimer],
    "partition": [partition_member] * 3 + [roster_watcher],
}
