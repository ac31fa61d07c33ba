from __future__ import annotations

from collections.abc import Callable

import pytest

from etcd_patterns import (
    ConflictError,
    EtcdUnavailableError,
    InvalidArgumentError,
    InvalidTypeError,
    OutcomeUnknownError,
)
from etcd_patterns._retry import Deadline, check_timeout, retry_conflicts, retry_transient


class FakeTime:
    """A clock that only moves when something sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(error: Exception, times: int) -> tuple[list[int], Callable[[], str]]:
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "ok"

    return calls, call


def test_deadline() -> None:
    time = FakeTime()
    deadline = Deadline(2.0, clock=time.clock)
    assert deadline.remaining() == 2.0
    time.now = 1.5
    assert not deadline.expired()
    assert deadline.within(10).remaining() == 0.5
    assert deadline.within(0.1).remaining() == pytest.approx(0.1)
    time.now = 2.5
    assert deadline.expired()
    assert deadline.remaining() == 0.0
    never = Deadline(None, clock=time.clock)
    assert never.remaining() is None
    assert not never.expired()
    assert never.within(3).remaining() == 3.0


def test_transient_errors_are_retried_until_success() -> None:
    time = FakeTime()
    calls, call = failing(EtcdUnavailableError("down"), times=3)
    policy = retry_transient(Deadline(5, clock=time.clock), write=True, sleep=time.sleep)
    assert policy(call) == "ok"
    assert len(calls) == 4
    assert all(0 <= s <= 1.0 for s in time.sleeps)


def test_transient_retries_stop_at_the_deadline() -> None:
    time = FakeTime()
    calls, call = failing(EtcdUnavailableError("down"), times=10**6)
    policy = retry_transient(Deadline(3, clock=time.clock), write=False, sleep=time.sleep)
    with pytest.raises(EtcdUnavailableError):
        policy(call)
    assert time.now == pytest.approx(3.0)
    assert len(calls) > 3


def test_ambiguous_write_is_not_retried_but_a_read_is() -> None:
    time = FakeTime()
    calls, call = failing(OutcomeUnknownError("lost"), times=1)
    with pytest.raises(OutcomeUnknownError):
        retry_transient(Deadline(5, clock=time.clock), write=True, sleep=time.sleep)(call)
    assert len(calls) == 1
    calls, call = failing(OutcomeUnknownError("lost"), times=1)
    assert (
        retry_transient(Deadline(5, clock=time.clock), write=False, sleep=time.sleep)(call) == "ok"
    )


@pytest.mark.parametrize("error", [ValueError("bug"), KeyError("k"), RuntimeError("user code")])
def test_bugs_are_never_retried(error: Exception) -> None:
    time = FakeTime()
    calls, call = failing(error, times=1)
    with pytest.raises(type(error)):
        retry_transient(Deadline(5, clock=time.clock), write=False, sleep=time.sleep)(call)
    assert len(calls) == 1
    assert time.sleeps == []


def test_conflicts_retry_until_a_result() -> None:
    time = FakeTime()
    results = iter([None, None, "won"])
    out = retry_conflicts(
        lambda: next(results),
        Deadline(None, clock=time.clock),
        give_up=lambda n: ConflictError(str(n)),
        sleep=time.sleep,
    )
    assert out == "won"
    # At once: the lost race returned the fresh state, which a wait would
    # only make stale.
    assert time.sleeps in ([], [0.0, 0.0])


def test_conflicts_give_up_at_the_deadline() -> None:
    time = FakeTime()

    def attempt() -> None:
        time.sleep(0.25)  # a round trip, on the fake clock

    with pytest.raises(ConflictError) as info:
        retry_conflicts(
            attempt,
            Deadline(1, clock=time.clock),
            give_up=lambda n: ConflictError(f"{n} attempts"),
            sleep=time.sleep,
        )
    assert isinstance(info.value, TimeoutError)
    assert time.now == pytest.approx(1.0)


def test_zero_timeout_means_one_attempt() -> None:
    time = FakeTime()
    attempts: list[int] = []

    def attempt() -> None:
        attempts.append(1)

    with pytest.raises(ConflictError):
        retry_conflicts(
            attempt,
            Deadline(0, clock=time.clock),
            give_up=lambda n: ConflictError(""),
            sleep=time.sleep,
        )
    assert attempts == [1]


@pytest.mark.parametrize("value", [None, 0, 0.5, 3])
def test_valid_timeouts(value: float | None) -> None:
    assert check_timeout(value) == value


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (-1, InvalidArgumentError),
        (float("nan"), InvalidArgumentError),
        (float("inf"), InvalidArgumentError),
        ("1", InvalidTypeError),
        (True, InvalidTypeError),
    ],
)
def test_invalid_timeouts(value: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        check_timeout(value)
