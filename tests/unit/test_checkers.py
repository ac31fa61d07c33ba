"""Each checker fails on a known-bad history, and passes the matching good one."""

from __future__ import annotations

from typing import Any

from tests.nemesis import checkers
from tests.nemesis.history import FAIL, OK, UNKNOWN, Op


def op(kind: str, outcome: str = OK, value: Any = None, **info: Any) -> Op:
    at = op.clock = getattr(op, "clock", 0.0) + 1.0  # type: ignore[attr-defined]
    return Op("p0", kind, at, at + 0.5, outcome, value, info=info)


def section(begin: float, end: float, token: int, **info: Any) -> Op:
    return Op("p0", "section", begin, end, info={"token": token, **info})


# -- counter ----------------------------------------------------------------------


def test_counter_catches_a_lost_increment() -> None:
    history = [op("incr"), op("incr"), op("incr", UNKNOWN)]
    assert checkers.check_counter(history, 2).ok
    assert checkers.check_counter(history, 3).ok
    assert not checkers.check_counter(history, 1).ok  # an acknowledged one is lost


def test_counter_catches_an_increment_applied_twice() -> None:
    history = [op("incr"), op("incr", FAIL)]
    assert not checkers.check_counter(history, 2).ok


# -- lock ---------------------------------------------------------------------------


def test_lock_catches_a_fenced_write_that_went_backwards() -> None:
    good = [section(0, 1, 10, previous=0), section(2, 3, 12, previous=10)]
    assert checkers.check_lock(good).ok
    bad = [section(0, 1, 12, previous=0), section(2, 3, 10, previous=12)]
    assert not checkers.check_lock(bad).ok


def test_lock_catches_overlapping_sections_without_a_reported_loss() -> None:
    assert not checkers.check_lock([section(0, 2, 10), section(1, 3, 12)]).ok
    verdict = checkers.check_lock([section(0, 2, 10, lost=True), section(1, 3, 12)])
    assert verdict.ok
    assert verdict.counts["overlaps after a reported loss"] == 1


def test_lock_catches_a_token_granted_twice() -> None:
    assert not checkers.check_lock([section(0, 1, 10), section(2, 3, 10)]).ok


# -- semaphore ----------------------------------------------------------------------


def test_semaphore_catches_more_holders_than_the_limit() -> None:
    two = [section(0, 3, 10), section(1, 4, 11), section(3, 5, 12)]
    assert checkers.check_semaphore(two, 2).ok  # one released as the third came in
    three = [section(0, 3, 10), section(1, 4, 11), section(2, 5, 12)]
    assert not checkers.check_semaphore(three, 2).ok
    lost = [section(0, 3, 10, lost=True), section(1, 4, 11), section(2, 5, 12)]
    assert checkers.check_semaphore(lost, 2).ok


def test_semaphore_catches_a_token_granted_twice() -> None:
    assert not checkers.check_semaphore([section(0, 1, 10), section(2, 3, 10)], 2).ok


# -- read-write lock ----------------------------------------------------------------


def rw(begin: float, end: float, mode: str, **info: Any) -> Op:
    return Op("p0", "section", begin, end, info={"token": 1, "mode": mode, **info})


def test_rwlock_allows_readers_together_and_catches_a_writer_overlapping() -> None:
    verdict = checkers.check_rwlock([rw(0, 3, "read"), rw(1, 4, "read"), rw(5, 6, "write")])
    assert verdict.ok
    assert verdict.counts["readers overlapping"] == 1
    assert not checkers.check_rwlock([rw(0, 3, "read"), rw(2, 4, "write")]).ok
    assert not checkers.check_rwlock([rw(0, 3, "write"), rw(2, 4, "write")]).ok
    assert checkers.check_rwlock([rw(0, 3, "write", lost=True), rw(2, 4, "write")]).ok


# -- double barrier -------------------------------------------------------------------


def inside(process: str, begin: float, end: float, number: int, left: bool = True) -> Op:
    return Op(process, "round", begin, end, info={"round": number, "left": left})


def leave(process: str, at: float, number: int) -> Op:
    return Op(process, "leave", at - 0.1, at, info={"round": number})


def test_double_barrier_catches_an_early_leaver_a_crowd_and_overlapping_rounds() -> None:
    good = [inside("a", 1, 2, 5), inside("b", 1.5, 2, 5), leave("a", 2.5, 5), leave("b", 2.5, 5)]
    good += [inside("a", 3, 4, 9), inside("b", 3, 4, 9)]
    assert checkers.check_double_barrier(good, 2).ok
    early = [inside("a", 1, 2, 5), inside("b", 3, 4, 5), leave("a", 2.5, 5)]
    assert not checkers.check_double_barrier(early, 2).ok
    crowd = [inside(p, 1, 2, 5) for p in "abc"]
    assert not checkers.check_double_barrier(crowd, 2).ok
    overlapping = [inside("a", 1, 3, 5), inside("b", 2, 4, 9)]
    assert not checkers.check_double_barrier(overlapping, 2).ok
    broken = [inside("a", 1, 3, 5, left=False), inside("b", 2, 4, 9, left=False)]
    assert checkers.check_double_barrier(broken, 2).ok
    alone = [inside("a", 1, 2, 5), leave("a", 2.5, 5)]
    assert not checkers.check_double_barrier(alone, 2).ok  # completed with one of two


# -- observer -----------------------------------------------------------------------


def test_observer_catches_leadership_going_back() -> None:
    good = [
        op("observe", value="p1", token=10),
        op("observe", value=None, token=None),
        op("observe", value="p2:12", token=12),
    ]
    assert checkers.check_observer(good).ok
    bad = [op("observe", value="p2:12", token=12), op("observe", value="p1", token=10)]
    assert not checkers.check_observer(bad).ok


def test_observer_catches_a_value_proclaimed_by_another_leader() -> None:
    assert not checkers.check_observer([op("observe", value="p1:10", token=12)]).ok


# -- queue --------------------------------------------------------------------------


def test_queue_catches_a_duplicate_a_loss_and_an_invention() -> None:
    enqueued = [op("enqueue", value="a:0"), op("enqueue", value="a:1")]
    good = [*enqueued, op("dequeue", value="a:0"), op("dequeue", value="a:1")]
    assert checkers.check_queue(good, remaining=[]).ok
    duplicate = [*good, op("dequeue", value="a:1")]
    assert not checkers.check_queue(duplicate, remaining=[]).ok
    lost = [*enqueued, op("dequeue", value="a:0")]
    assert not checkers.check_queue(lost, remaining=[]).ok
    assert checkers.check_queue(lost, remaining=["a:1"]).ok  # still queued is fine
    invented = [*good, op("dequeue", value="b:0")]
    assert not checkers.check_queue(invented, remaining=[]).ok


def test_queue_allows_an_uncertain_take_once_at_most() -> None:
    enqueued = [op("enqueue", value="a:0")]
    unknown = [*enqueued, op("dequeue", UNKNOWN, uncertain=["a:0"])]
    assert checkers.check_queue(unknown, remaining=[]).ok  # taken, by nobody
    assert checkers.check_queue(unknown, remaining=["a:0"]).ok  # or still there
    assert not checkers.check_queue([*unknown, op("dequeue", value="a:0")], ["a:0"]).ok


def test_queue_catches_one_producers_items_out_of_order() -> None:
    enqueued = [op("enqueue", value="a:0"), op("enqueue", value="a:1")]
    swapped = [*enqueued, op("dequeue", value="a:1"), op("dequeue", value="a:0")]
    assert not checkers.check_queue(swapped, remaining=[]).ok


# -- claims -------------------------------------------------------------------------


def _claims(history: list[Op], remaining: list[str], dead: tuple[str, ...] = ()) -> Any:
    return checkers.check_claims(history, remaining, list(dead), max_deliveries=3)


def test_claims_catch_an_item_acked_twice_or_never() -> None:
    enqueued = [op("enqueue", value="a:0")]
    once = [*enqueued, op("claim", value="a:0", ended="acked", token=5, deliveries=1)]
    assert _claims(once, remaining=[]).ok
    twice = [*once, op("claim", value="a:0", ended="acked", token=9, deliveries=2)]
    assert not _claims(twice, remaining=[]).ok
    assert not _claims(enqueued, remaining=[]).ok  # never acked, not queued


def test_claims_count_redeliveries_after_a_release() -> None:
    history = [
        op("enqueue", value="a:0"),
        op("claim", value="a:0", ended="released", token=5, deliveries=1),
        op("claim", value="a:0", ended="acked", token=9, deliveries=2),
    ]
    verdict = _claims(history, remaining=[])
    assert verdict.ok
    assert verdict.counts["redeliveries"] == 1
    # Claimed again after the ack, by etcd's order, whatever the clocks say.
    history.insert(1, op("claim", value="a:0", ended="released", token=12, deliveries=3))
    assert not _claims(history, remaining=[]).ok


def test_claims_catch_a_dead_letter_that_also_ended_otherwise() -> None:
    enqueued = [op("enqueue", value="a:0")]
    released = [
        *enqueued,
        *(op("claim", value="a:0", ended="released", token=t, deliveries=t) for t in (1, 2, 3)),
    ]
    assert _claims(released, remaining=[], dead=("a:0",)).ok
    assert not _claims(released, remaining=["a:0"], dead=("a:0",)).ok  # queued and dead
    assert not _claims(released, remaining=[], dead=("a:0", "a:0")).ok  # dead twice
    acked = [*enqueued, op("claim", value="a:0", ended="acked", token=5, deliveries=1)]
    assert not _claims(acked, remaining=[], dead=("a:0",)).ok  # acked and dead
    assert not _claims(enqueued, remaining=[], dead=("b:0",)).ok  # never enqueued


def test_claims_catch_deliveries_past_the_limit_or_miscounted() -> None:
    enqueued = [op("enqueue", value="a:0")]
    four = [
        *enqueued,
        *(op("claim", value="a:0", ended="released", token=t, deliveries=t) for t in (1, 2, 3)),
        op("claim", value="a:0", ended="acked", token=4, deliveries=4),
    ]
    assert not _claims(four, remaining=[]).ok  # a fourth delivery, with three allowed
    same_count = [
        *enqueued,
        op("claim", value="a:0", ended="released", token=1, deliveries=1),
        op("claim", value="a:0", ended="acked", token=2, deliveries=1),
    ]
    assert not _claims(same_count, remaining=[]).ok  # the second delivery was not counted
    crashed_between = [
        *enqueued,
        op("claim", value="a:0", ended="released", token=1, deliveries=1),
        op("claim", value="a:0", ended="acked", token=7, deliveries=3),  # one lost in a crash
    ]
    assert _claims(crashed_between, remaining=[]).ok


# -- timeouts -----------------------------------------------------------------------


def test_timeouts_catch_a_call_past_its_bound() -> None:
    quick = Op("p0", "incr", 0.0, 1.0, bound=1.0)
    assert checkers.check_timeouts([quick]).ok
    slow = Op("p0", "incr", 0.0, 1.0 + checkers.TIMEOUT_SLACK + 0.1, bound=1.0)
    assert not checkers.check_timeouts([slow]).ok


# -- watch --------------------------------------------------------------------------


def _watched(*values: int, stream: int = 0) -> list[Op]:
    return [op("watch", value=value, stream=stream) for value in values]


def test_watch_accepts_states_that_move_forward_to_the_end() -> None:
    assert checkers.check_watch(_watched(0, 3, 7, 9), final=9).ok
    # A new stream may yield the value the last one ended at.
    assert checkers.check_watch([*_watched(0, 3), *_watched(3, 9, stream=1)], final=9).ok


def test_watch_catches_a_state_that_goes_back_repeats_or_was_never_written() -> None:
    assert not checkers.check_watch(_watched(0, 5, 4, 9), final=9).ok  # back in time
    assert not checkers.check_watch(_watched(0, 5, 5, 9), final=9).ok  # the same twice
    assert not checkers.check_watch(_watched(0, 12), final=12 - 1).ok  # never written
    assert not checkers.check_watch(_watched(0, 5), final=9).ok  # missed the latest


# -- partition --------------------------------------------------------------------

ITEMS = ["a", "b", "c", "d"]


def _joined(process: str, token: int, at: float) -> list[Op]:
    """A join that returned at ``at``, and a stay until ``at + 10``."""
    return [
        Op(process, "join", at - 0.5, at, info={"token": token}),
        Op(process, "member", at, at + 10, info={"token": token, "lost": False}),
    ]


def _read(
    process: str, at: float, revision: int, created: dict[str, int], owned: list[str] | None = None
) -> Op:
    info: dict[str, Any] = {"stream": 0, "revision": revision, "created": created}
    if owned is None:
        return Op(process, "roster", at, at + 0.1, info=info)
    return Op(
        process, "share", at, at + 0.1, info={**info, "owned": owned, "token": created[process]}
    )


def _partition_history(**change: Any) -> list[Op]:
    both = {"m1": 5, "m2": 6}
    history = [
        *_joined("m1", 5, 1),
        *_joined("m2", 6, 2),
        _read("m1", 3, 6, both, change.get("m1", ["a", "b"])),
        _read("m2", 3, 6, both, change.get("m2", ["c", "d"])),
        _read("w", 4, change.get("revision", 6), change.get("watched", both)),
        _read("w", 20, 9, {}),
    ]
    return history


def test_partition_accepts_agreeing_disjoint_covering_shares() -> None:
    verdict = checkers.check_partition(_partition_history(), ITEMS, final={})
    assert verdict.ok, verdict.violations
    assert verdict.counts["revisions every member reported"] == 1


def test_partition_catches_shares_that_overlap_or_leave_items_out() -> None:
    assert not checkers.check_partition(_partition_history(m2=["b", "c", "d"]), ITEMS, {}).ok
    assert not checkers.check_partition(_partition_history(m2=["c"]), ITEMS, {}).ok


def test_partition_catches_two_memberships_at_one_revision_and_a_revision_going_back() -> None:
    one = {"m1": 5}
    found = checkers.check_partition(_partition_history(watched=one), ITEMS, {}).violations
    assert any(line.startswith("two memberships at revision 6") for line in found)
    history = [*_partition_history(), _read("w", 21, 8, {})]
    assert (
        checkers.check_partition(history, ITEMS, {}).violations
        == [
            line
            for line in checkers.check_partition(history, ITEMS, {}).violations
            if line.startswith("revision went back")
        ]
        != []
    )


def test_partition_catches_a_live_member_missing_or_a_member_never_joined() -> None:
    # m2's stay spans the watcher's read at revision 7, which lists m1 alone.
    missing = [*_partition_history(), _read("w", 5, 7, {"m1": 5})]
    assert not checkers.check_partition(missing, ITEMS, {}).ok
    # Unless m2 reported its loss.
    lost = [
        op
        if op.kind != "member" or op.process != "m2"
        else Op("m2", "member", op.invoke, op.complete, info={"token": 6, "lost": True})
        for op in missing
    ]
    assert checkers.check_partition(lost, ITEMS, {}).ok
    phantom = [*_partition_history(), _read("w", 5, 7, {"m1": 5, "m2": 6, "m3": 7})]
    assert not checkers.check_partition(phantom, ITEMS, {}).ok


def test_partition_catches_a_watcher_that_missed_the_end_or_a_member_left_behind() -> None:
    ended_early = [op for op in _partition_history() if op.invoke != 20]
    assert not checkers.check_partition(ended_early, ITEMS, {}).ok
    assert not checkers.check_partition(_partition_history(), ITEMS, {"m1": 5}).ok
