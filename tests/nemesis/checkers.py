"""Checkers: each decides whether a recorded history keeps one guarantee.

Each returns a `Verdict`: the violations found (empty when the history is
legal), with the offending operations, and what it counted. Every checker
has a test that feeds it a known-bad history and sees it fail
(tests/unit/test_checkers.py).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from tests.nemesis.history import OK, UNKNOWN, Op

# How far past its bound a call may return: scheduling on a loaded machine,
# and the clock reads around the call.
TIMEOUT_SLACK = 1.0


@dataclass
class Verdict:
    """What a checker found.

    Attributes:
        checker: Its name.
        violations: One line per broken promise, naming the operations.
        counts: What it counted (operations by outcome, redeliveries...).
    """

    checker: str
    violations: list[str] = field(default_factory=list)
    counts: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations


def _show(op: Op) -> str:
    return (
        f"[{op.process} {op.kind} {op.outcome} value={op.value!r} "
        f"t={op.invoke:.3f}..{op.complete:.3f} {op.info or ''}{op.error}]"
    )


def check_counter(history: Sequence[Op], final: int) -> Verdict:
    """Acknowledged increments are never lost, and none is applied twice.

    The final value must be at least the acknowledged increments and at
    most those plus the ones whose outcome is unknown.
    """
    verdict = Verdict("counter")
    incr = [op for op in history if op.kind == "incr"]
    acked = sum(op.outcome == OK for op in incr)
    unknown = sum(op.outcome == UNKNOWN for op in incr)
    verdict.counts = {"acknowledged": acked, "unknown": unknown, "final": final}
    if final < acked:
        verdict.violations.append(f"final value {final} < {acked} acknowledged increments")
    if final > acked + unknown:
        verdict.violations.append(
            f"final value {final} > {acked} acknowledged + {unknown} unknown increments"
        )
    return verdict


def check_watch(history: Sequence[Op], final: int) -> Verdict:
    """A watcher's states were written, never go back, and end at the final value.

    Each "watch" op yields the counter's value. Per watcher: every value is
    between 0 and ``final``; values never decrease (each comes from a read
    at a later revision); one stream never yields the same value twice in
    a row; and the last value, once the writers stopped and no change came
    for a while, is ``final``: the latest state is never missed.
    """
    verdict = Verdict("watch")
    yielded: dict[str, list[Op]] = defaultdict(list)
    for op in history:
        if op.kind == "watch" and op.outcome == OK:
            yielded[op.process].append(op)
    for process, ops in yielded.items():
        for before, after in itertools.pairwise(ops):
            if after.value < before.value:
                verdict.violations.append(
                    f"{process} saw {after.value} after {before.value}: {_show(after)}"
                )
            same_stream = before.info.get("stream") == after.info.get("stream")
            if same_stream and after.value == before.value:
                verdict.violations.append(f"{process} was given {after.value} twice in a row")
        for op in ops:
            if not 0 <= op.value <= final:
                verdict.violations.append(f"{process} saw {op.value}, never written: {_show(op)}")
        if ops[-1].value != final:
            verdict.violations.append(
                f"{process} ended at {ops[-1].value}, not at the final value {final}"
            )
    verdict.counts = {
        "states yielded": sum(len(ops) for ops in yielded.values()),
        "watchers": len(yielded),
    }
    return verdict


def check_lock(history: Sequence[Op]) -> Verdict:
    """Fenced writes never go backwards; unfenced sections overlap only after a reported loss.

    Each "section" op holds the lock from ``invoke`` to ``complete``; its
    ``info`` carries the fencing ``token``, the token its guarded write saw
    before it (``previous``, if the write applied) and whether the library
    reported the lock ``lost``.
    """
    verdict = Verdict("lock")
    sections = [op for op in history if op.kind == "section" and "token" in op.info]
    writes = [op for op in sections if op.info.get("previous") is not None]
    for op in writes:
        if op.info["previous"] >= op.info["token"]:
            verdict.violations.append(f"guarded write went backwards: {_show(op)}")
    tokens = Counter(op.info["token"] for op in sections)
    for token, times in tokens.items():
        if times > 1:
            verdict.violations.append(f"fencing token {token} granted {times} times")
    overlaps = unexplained = 0
    ordered = sorted(sections, key=lambda op: op.invoke)
    for a, b in itertools.combinations(ordered, 2):
        if b.invoke >= a.complete:
            continue
        overlaps += 1
        if not (a.info.get("lost") or b.info.get("lost")):
            unexplained += 1
            verdict.violations.append(f"sections overlap, no loss reported: {_show(a)} {_show(b)}")
    verdict.counts = {
        "sections": len(sections),
        "guarded writes": len(writes),
        "overlaps after a reported loss": overlaps - unexplained,
        "losses reported": sum(bool(op.info.get("lost")) for op in sections),
    }
    return verdict


def check_semaphore(history: Sequence[Op], limit: int) -> Verdict:
    """No more than ``limit`` sections at once, but where a loss was reported; no token twice.

    Each "section" op holds a permit from ``invoke`` to ``complete`` (from
    after the acquisition returned until before the release was sent), so
    the sections etcd saw at once are at least those that overlap here.
    """
    verdict = Verdict("semaphore")
    sections = [op for op in history if op.kind == "section" and "token" in op.info]
    tokens = Counter(op.info["token"] for op in sections)
    for token, times in tokens.items():
        if times > 1:
            verdict.violations.append(f"fencing token {token} granted {times} times")
    held = sorted(
        [(op.invoke, 1, op) for op in sections if not op.info.get("lost")]
        + [(op.complete, -1, op) for op in sections if not op.info.get("lost")],
        key=lambda event: (event[0], event[1]),  # a release before an acquisition at one instant
    )
    now = most = 0
    for _, change, op in held:
        now += change
        most = max(most, now)
        if now > limit:
            verdict.violations.append(f"{now} permits held at once, limit {limit}: {_show(op)}")
    verdict.counts = {
        "sections": len(sections),
        "most held at once": most,
        "losses reported": sum(bool(op.info.get("lost")) for op in sections),
    }
    return verdict


def check_rwlock(history: Sequence[Op]) -> Verdict:
    """A writer's section overlaps no other section, but where a loss was reported.

    Each "section" op holds the read-write lock in ``info["mode"]`` from
    ``invoke`` to ``complete``; readers' sections may overlap each other.
    """
    verdict = Verdict("rwlock")
    sections = sorted(
        (op for op in history if op.kind == "section" and "mode" in op.info),
        key=lambda op: op.invoke,
    )
    shared = 0
    active: list[Op] = []
    for op in sections:
        active = [a for a in active if a.complete > op.invoke]
        for other in active:
            if "write" in (op.info["mode"], other.info["mode"]):
                if not (op.info.get("lost") or other.info.get("lost")):
                    verdict.violations.append(
                        f"a writer overlapped, no loss reported: {_show(other)} {_show(op)}"
                    )
            else:
                shared += 1
        active.append(op)
    verdict.counts = {
        "sections": len(sections),
        "writes": sum(op.info["mode"] == "write" for op in sections),
        "readers overlapping": shared,
    }
    return verdict


def check_double_barrier(history: Sequence[Op], participants: int) -> Verdict:
    """Rounds of at most ``participants``; nobody out before all are in; rounds in turn.

    Each "round" op is one participant's time inside round ``info["round"]``
    (the round's number), and whether its leaving returned (``left``);
    "leave" ops are the leavings. Rounds that broke (a leaving failed) are
    held to the first rule only: a participant that lost its own lease may
    still be inside when the next round begins.
    """
    verdict = Verdict("double barrier")
    rounds: dict[int, list[Op]] = defaultdict(list)
    for op in history:
        if op.kind == "round":
            rounds[op.info["round"]].append(op)
    leaves: dict[int, list[Op]] = defaultdict(list)
    for op in history:
        if op.kind == "leave" and op.outcome == OK:
            leaves[op.info["round"]].append(op)
    for number, inside in rounds.items():
        if len({op.process for op in inside}) > participants:
            verdict.violations.append(f"round {number} had {len(inside)} participants")
        last_in = max(op.invoke for op in inside)
        for op in leaves[number]:
            if op.complete < last_in:
                verdict.violations.append(
                    f"left round {number} before everyone was in: {_show(op)}"
                )
    whole = sorted(n for n, inside in rounds.items() if all(op.info["left"] for op in inside))
    for number in whole:
        if len(rounds[number]) != participants:
            verdict.violations.append(
                f"round {number} completed with {len(rounds[number])} participants, "
                f"not {participants}"
            )
    for earlier, later in itertools.pairwise(whole):
        if min(op.invoke for op in rounds[later]) < max(op.complete for op in rounds[earlier]):
            verdict.violations.append(f"round {later} began before round {earlier} ended")
    verdict.counts = {
        "rounds": len(rounds),
        "rounds completed": len(whole),
    }
    return verdict


def check_observer(history: Sequence[Op]) -> Verdict:
    """An observer never sees leadership go back, nor a value proclaimed by another leader.

    Each "observe" op is one state an observer saw: the leader's value (None
    if nobody led) and its fencing ``token``. The leader is the oldest
    candidate, so its token never decreases as time goes on, and etcd's
    reads are linearizable, so neither does what one observer sees. A
    candidate proclaims ``"<name>:<token>"`` with its own token: a value
    naming another token was written to another leader's key.
    """
    verdict = Verdict("observer")
    states = [op for op in history if op.kind == "observe" and op.outcome == OK]
    last: dict[str, Op] = {}
    for op in states:
        token = op.info.get("token")
        if token is None:
            continue
        before = last.get(op.process)
        if before is not None and token < before.info["token"]:
            verdict.violations.append(f"leadership went back: {_show(before)} {_show(op)}")
        last[op.process] = op
        _, colon, proclaimed = str(op.value).rpartition(":")
        if colon and int(proclaimed) != token:
            verdict.violations.append(f"a value proclaimed by another leader: {_show(op)}")
    verdict.counts = {
        "states seen": len(states),
        "leaders seen": len({op.info.get("token") for op in states} - {None}),
    }
    return verdict


def check_queue(history: Sequence[Op], remaining: Sequence[str]) -> Verdict:
    """Exactly-once delivery by `dequeue`, and each producer's order per consumer.

    Every acknowledged enqueue is delivered exactly once (by a dequeue, or
    still ``remaining`` in the queue at the end, or named ``uncertain`` by a
    take whose outcome is unknown); an enqueue whose outcome is unknown at
    most once; nothing that was never enqueued is delivered.
    """
    verdict = Verdict("queue")
    enqueued = {op.value: op for op in history if op.kind == "enqueue"}
    acked = {value for value, op in enqueued.items() if op.outcome == OK}
    unknown_enqueues = {value for value, op in enqueued.items() if op.outcome == UNKNOWN}
    delivered: Counter[str] = Counter()
    uncertain: set[str] = set()
    for op in history:
        if op.kind != "dequeue":
            continue
        if op.outcome == OK:
            delivered.update(op.value if isinstance(op.value, list) else [op.value])
        elif op.outcome == UNKNOWN:
            delivered.update(op.info.get("taken", []))
            uncertain.update(op.info.get("uncertain", []))
    delivered.update(remaining)
    for value, times in delivered.items():
        if value not in enqueued:
            verdict.violations.append(f"delivered {value!r}, which was never enqueued")
        elif times > 1:
            verdict.violations.append(
                f"{value!r} delivered {times} times: {_show(enqueued[value])}"
            )
    for value in sorted(acked):
        if delivered[value] == 0 and value not in uncertain:
            verdict.violations.append(f"acknowledged {value!r} never delivered")
    _check_order(history, uncertain, verdict)
    verdict.counts = {
        "enqueued": len(acked),
        "unknown enqueues": len(unknown_enqueues),
        "delivered": sum(delivered.values()),
        "unknown takes": len(uncertain),
    }
    return verdict


def _check_order(history: Sequence[Op], uncertain: set[str], verdict: Verdict) -> None:
    """One consumer receives any one producer's items in that producer's order."""
    received: dict[str, list[str]] = defaultdict(list)
    for op in history:
        if op.kind == "dequeue" and op.outcome == OK:
            values = op.value if isinstance(op.value, list) else [op.value]
            received[op.process] += [v for v in values if v not in uncertain]
    for consumer, values in received.items():
        last: dict[str, int] = {}
        for value in values:
            producer, _, number = value.rpartition(":")
            if int(number) < last.get(producer, -1):
                verdict.violations.append(
                    f"{consumer} received {value!r} after {producer}:{last[producer]}"
                )
            last[producer] = int(number)


def check_claims(
    history: Sequence[Op], remaining: Sequence[str], dead: Sequence[str], max_deliveries: int
) -> Verdict:
    """Claim/ack: every acknowledged enqueue ends exactly once: acked, queued or dead.

    A "claim" op names the item it claimed, its fencing ``token`` (claims are
    ordered by it, as etcd ordered them), its ``deliveries`` count and, in
    ``info["ended"]``, how the claim ended: "acked", "released", "lost" or
    "unknown". No claim may follow an acked one; the others are
    redeliveries, and counted. No item is delivered more than
    ``max_deliveries`` times, and each delivery's count exceeds the last,
    by at least one per delivery seen.
    """
    verdict = Verdict("claims")
    enqueued = {op.value: op for op in history if op.kind == "enqueue"}
    acked: Counter[str] = Counter()
    claims: dict[str, list[Op]] = defaultdict(list)
    for op in history:
        if op.kind == "claim" and op.value is not None:
            claims[op.value].append(op)
            if op.info.get("ended") == "acked":
                acked[op.value] += 1
    unsettled = {
        value
        for value, ops in claims.items()
        if any(op.info.get("ended") == "unknown" for op in ops)
    }
    redeliveries = 0
    for value, ops in claims.items():
        if value not in enqueued:
            verdict.violations.append(f"claimed {value!r}, which was never enqueued")
        if acked[value] > 1:
            verdict.violations.append(f"{value!r} acked {acked[value]} times")
        ordered = sorted(ops, key=lambda op: op.info.get("token", 0))
        _check_deliveries(value, ordered, max_deliveries, verdict)
        for before, after in itertools.pairwise(ordered):
            redeliveries += 1
            if before.info.get("ended") == "acked":
                verdict.violations.append(
                    f"{value!r} claimed again after it was acked: {_show(before)} {_show(after)}"
                )
    buried = Counter(dead)
    _check_ends(enqueued, acked, Counter(remaining), buried, unsettled, verdict)
    verdict.counts = {
        "enqueued": sum(op.outcome == OK for op in enqueued.values()),
        "acked": sum(acked.values()),
        "redeliveries": redeliveries,
        "dead letters": sum(buried.values()),
        "unsettled acks": len(unsettled),
    }
    return verdict


def _check_ends(
    enqueued: dict[str, Op],
    acked: Counter[str],
    left: Counter[str],
    buried: Counter[str],
    unsettled: set[str],
    verdict: Verdict,
) -> None:
    """Each acknowledged enqueue ends once: acked, still queued, or a dead letter."""
    for value, op in enqueued.items():
        if op.outcome != OK:
            continue
        ends = acked[value] + left[value] + buried[value]
        if ends == 0 and value not in unsettled:
            verdict.violations.append(f"acknowledged {value!r} never acked, and not queued")
        if ends > 1:
            verdict.violations.append(
                f"{value!r} ended {ends} times: acked {acked[value]}, queued {left[value]}, "
                f"dead {buried[value]}"
            )
    for value in buried:
        if value not in enqueued:
            verdict.violations.append(f"{value!r} is a dead letter, but was never enqueued")


def _check_deliveries(
    value: str, ordered: Sequence[Op], max_deliveries: int, verdict: Verdict
) -> None:
    """The claims of one item, in token order, count its deliveries up to the limit."""
    if len(ordered) > max_deliveries:
        verdict.violations.append(
            f"{value!r} delivered {len(ordered)} times, max_deliveries {max_deliveries}"
        )
    last = 0
    for op in ordered:
        count = op.info.get("deliveries", 0)
        if count <= last or count > max_deliveries:
            verdict.violations.append(
                f"{value!r} delivered with count {count} after count {last}: {_show(op)}"
            )
        last = count


def check_partition(history: Sequence[Op], items: Sequence[str], final: dict[str, int]) -> Verdict:
    """Memberships read by anyone agree, include every live member, and split the items.

    "share" ops (a partition member's share) and "roster" ops (a watcher's
    membership) carry the membership read's ``revision`` and ``created``
    (member id to its key's create revision). "member" ops span a stay in
    the group, from the join's return to the leave's call or to the time
    etcd last confirmed the member's lease, whichever came first, with the
    member's ``token`` and whether a loss was reported (``lost``).

    * One revision, one membership, whoever read it.
    * One stream's revisions increase.
    * Every member listed was joined, with the token its join returned (or
      by a join whose outcome is unknown): nothing listed was never written.
    * A member whose stay spans a read is in it, unless it reported a loss.
    * The shares of one revision are disjoint, each owner's is its own
      (the owner is listed with its token), and when every member listed
      reported its share at that revision, they cover every item.
    * Every watcher's last membership is the final one, and the final one
      is empty: everyone left, or was removed with its lease.
    """
    verdict = Verdict("partition")
    reads = sorted(
        (op for op in history if op.kind in ("share", "roster") and op.outcome == OK),
        key=lambda op: op.invoke,
    )
    by_revision: dict[int, list[Op]] = defaultdict(list)
    streams: dict[tuple[str, int], list[Op]] = defaultdict(list)
    for op in reads:
        by_revision[op.info["revision"]].append(op)
        streams[op.process, op.info["stream"]].append(op)
    for revision, ops in sorted(by_revision.items()):
        for op in ops[1:]:
            if op.info["created"] != ops[0].info["created"]:
                verdict.violations.append(
                    f"two memberships at revision {revision}: {_show(ops[0])} {_show(op)}"
                )
    for ops in streams.values():
        for before, after in itertools.pairwise(ops):
            if after.info["revision"] <= before.info["revision"]:
                verdict.violations.append(f"revision went back: {_show(before)} {_show(after)}")
    _check_listed(history, reads, verdict)
    covered = sum(_check_shares(ops, items, verdict) for ops in by_revision.values())
    if final:
        verdict.violations.append(f"members left behind: {final}")
    watchers: dict[str, list[Op]] = defaultdict(list)
    for op in reads:
        if op.kind == "roster":
            watchers[op.process].append(op)
    for process, ops in watchers.items():
        if ops[-1].info["created"] != final:
            verdict.violations.append(
                f"{process} ended at {ops[-1].info['created']}, not at the final {final}"
            )
    stays = [op for op in history if op.kind == "member"]
    verdict.counts = {
        "reads": len(reads),
        "revisions": len(by_revision),
        "revisions every member reported": covered,
        "stays": len(stays),
        "losses reported": sum(bool(op.info["lost"]) for op in stays),
        "rosters yielded": sum(len(ops) for ops in watchers.values()),
    }
    return verdict


def _check_listed(history: Sequence[Op], reads: Sequence[Op], verdict: Verdict) -> None:
    """Everyone listed joined; everyone whose stay spans a read is listed, but for a loss."""
    joined = {
        (op.process, op.info["token"]) for op in history if op.kind == "join" and op.outcome == OK
    }
    in_doubt = {op.process for op in history if op.kind == "join" and op.outcome == UNKNOWN}
    for op in reads:
        for member, token in op.info["created"].items():
            if (member, token) not in joined and member not in in_doubt:
                verdict.violations.append(f"{member}@{token} listed, never joined: {_show(op)}")
    for stay in history:
        if stay.kind != "member" or stay.info["lost"]:
            continue
        for op in reads:
            spanned = stay.invoke < op.invoke and op.complete < stay.complete
            if spanned and op.info["created"].get(stay.process) != stay.info["token"]:
                verdict.violations.append(
                    f"{stay.process}@{stay.info['token']} missing, no loss reported: "
                    f"{_show(op)} within {_show(stay)}"
                )


def _check_shares(reads: Sequence[Op], items: Sequence[str], verdict: Verdict) -> bool:
    """The shares read at one revision; whether every member listed reported one."""
    listed = reads[0].info["created"]
    shares = {op.process: op.info["owned"] for op in reads if op.kind == "share"}
    for op in reads:
        if op.kind == "share" and listed.get(op.process) != op.info["token"]:
            verdict.violations.append(f"a share for a member not listed: {_show(op)}")
    owners = Counter(item for owned in shares.values() for item in owned)
    twice = sorted(item for item, n in owners.items() if n > 1)
    revision = reads[0].info["revision"]
    if twice:
        verdict.violations.append(f"items owned twice at revision {revision}: {twice}")
    if not shares or set(shares) != set(listed):
        return False
    if set(owners) != set(items):
        nobody = sorted(set(items) - set(owners))
        verdict.violations.append(f"items owned by nobody at revision {revision}: {nobody}")
    return True


def check_timeouts(history: Sequence[Op], slack: float = TIMEOUT_SLACK) -> Verdict:
    """Every call returns or raises within its bound plus ``slack``."""
    verdict = Verdict("timeouts")
    worst: dict[str, float] = {}
    for op in history:
        if op.bound is None:
            continue
        overrun = (op.complete - op.invoke) - op.bound  # negative: within the bound
        worst[op.kind] = max(worst.get(op.kind, overrun), overrun)
        if overrun > slack:
            took = op.complete - op.invoke
            verdict.violations.append(
                f"took {took:.2f}s, bound {op.bound:.2f}s + {slack}s: {_show(op)}"
            )
    verdict.counts = {f"worst overrun {kind} (s)": round(value, 3) for kind, value in worst.items()}
    return verdict
