"""Client processes that exercise one pattern each and record every operation.

Each runs in its own (spawned) process against the proxied endpoints until
``stop`` is set. Each kind of call has its own bound on time, from the
instance's `TIMEOUT` (one request, settling included), each call's own
`OP_TIMEOUT` and the session's `CLEANUP_TIMEOUT`; see `BOUNDS`.
"""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path
from typing import Any

from etcd_patterns import (
    EtcdPatterns,
    EtcdPatternsError,
    LockLostError,
    OutcomeUnknownError,
)
from etcd_patterns._queue import PREFETCH
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
    # a lease grant, a read, a take; dequeue_many's follow-up takes get one more
    "dequeue": OP_TIMEOUT + 4 * TIMEOUT,
    # as dequeue, then the ack, or the release of the claim
    "claim": OP_TIMEOUT + 4 * TIMEOUT + CLEANUP_TIMEOUT,
}
NAMESPACE = "/nemesis/"


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


def lock(endpoints: list[str], out: str, name: str, stop: Any) -> None:
    """Take the lock; in each section, write the fencing token to a register, guarded."""
    recorder = Recorder(Path(out), name)
    chance = random.Random(name)
    with _connect(endpoints) as etcd:
        while not stop.is_set():
            holding = etcd.locked("L", timeout=OP_TIMEOUT)
            with recorder.op("acquire", bound=BOUNDS["acquire"]) as op:
                held = holding.__enter__()
            if op.outcome != OK:
                continue
            began = time.monotonic()
            token, previous, lost = held.fencing_token, None, False
            seen: list[int] = []

            def write(value: str, token: int = token, seen: list[int] = seen) -> str:
                seen.append(int(value))
                return str(token)

            try:
                etcd.transform("register", write, default="0", guard=held, timeout=OP_TIMEOUT)
                previous = seen[-1]
            except LockLostError:
                lost = True
            except EtcdPatternsError:
                pass  # not written, or not known to be: nothing to check
            time.sleep(chance.uniform(0, 0.02))  # the section's own work
            ended = time.monotonic()
            lost = lost or held.lost.is_set()
            try:
                holding.__exit__(None, None, None)
            except LockLostError:
                lost = True
            except EtcdPatternsError:
                pass
            recorder.record(
                Op(
                    name,
                    "section",
                    began,
                    ended,
                    info={"token": token, "previous": previous, "lost": lost},
                )
            )
    recorder.close()


def producer(endpoints: list[str], out: str, name: str, stop: Any) -> None:
    """Enqueue numbered items, each named after this producer."""
    recorder = Recorder(Path(out), name)
    with _connect(endpoints) as etcd:
        for number in itertools.count():
            if stop.is_set():
                break
            value = f"{name}:{number}"
            with recorder.op("enqueue", value=value, bound=BOUNDS["enqueue"]):
                etcd.enqueue("q", value)
    recorder.close()


# More than one read of candidates fetches, so that a batch often takes
# what it read and then reads and takes again within the one call.
BATCH = PREFETCH + 8


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
    """Claim items; ack most, give some back."""
    recorder = Recorder(Path(out), name)
    chance = random.Random(name)
    with _connect(endpoints) as etcd:
        while not stop.is_set():
            claim_one(etcd, recorder, release=chance.random() < 0.1)
    recorder.close()


def claim_one(
    etcd: EtcdPatterns, recorder: Recorder, *, release: bool, timeout: float = OP_TIMEOUT
) -> bool:
    """Claim one item and ack it (or give it back); whether there was one."""
    claiming = etcd.claim("q", timeout=timeout)
    with recorder.op("claim", bound=BOUNDS["claim"]) as op:
        item = claiming.__enter__()
        op.value, op.info["token"] = item.value, item.fencing_token
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


WORKLOADS: dict[str, list[Any]] = {
    "counter": [counter, counter, counter],
    "lock": [lock, lock, lock],
    "queue": [producer, producer, consumer, consumer],
    "claims": [producer, producer, claimer, claimer],
}
