"""Deadlines and the one retry policy.

Every retry loop in the library is a tenacity `Retrying` built here, so there
is exactly one answer to "what is retried, how long, how often":

* `retry_transient` retries a request while etcd is unavailable, with
  jittered exponential backoff, until the deadline. A write whose outcome is
  unknown (`OutcomeUnknownError`) is never retried blindly: the caller must
  resolve it. Nothing else is ever retried, so a bug, a permission error or
  an exception from user code propagates at once.
* `retry_conflicts` repeats an optimistic attempt that lost a race at once,
  with the fresh state the lost race returned, until the deadline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar, cast

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    retry_if_result,
    wait_none,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from ._errors import (
    EtcdUnavailableError,
    InvalidArgumentError,
    InvalidTypeError,
    OutcomeUnknownError,
)

T = TypeVar("T")

Clock = Callable[[], float]
Sleep = Callable[[float], None]


class Deadline:
    """A moment after which an operation stops waiting.

    Args:
        timeout: Seconds from now; None means never.
        clock: A monotonic clock, injectable for tests.
    """

    __slots__ = ("_at", "_clock")

    def __init__(self, timeout: float | None, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._at = None if timeout is None else clock() + timeout

    @property
    def clock(self) -> Clock:
        """The clock this deadline is measured on."""
        return self._clock

    def remaining(self) -> float | None:
        """Seconds left, never negative; None if the deadline is never."""
        if self._at is None:
            return None
        return max(0.0, self._at - self._clock())

    def expired(self) -> bool:
        """Whether no time is left."""
        return self._at is not None and self._clock() >= self._at

    def within(self, seconds: float) -> Deadline:
        """The earlier of this deadline and ``seconds`` from now."""
        other = Deadline(seconds, clock=self._clock)
        if self._at is not None and other._at is not None and self._at < other._at:
            return self
        return other


def check_count(value: object, *, name: str) -> int:
    """Validate a count argument (a limit, a batch size): an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTypeError(f"{name} must be an int, not {value!r}")
    if value < 1:
        raise InvalidArgumentError(f"{name} must be >= 1, not {value}")
    return value


def check_timeout(timeout: object, *, name: str = "timeout") -> float | None:
    """Validate a ``timeout`` argument: None, or a finite number >= 0."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidTypeError(f"{name} must be a number of seconds or None, not {timeout!r}")
    if math.isnan(timeout) or timeout < 0 or math.isinf(timeout):
        raise InvalidArgumentError(f"{name} must be a finite number >= 0, not {timeout!r}")
    return float(timeout)


class _wait_within(wait_base):
    """Wraps a wait strategy so it never sleeps past the deadline."""

    def __init__(self, base: wait_base, deadline: Deadline) -> None:
        self._base = base
        self._deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self._base(retry_state)
        remaining = self._deadline.remaining()
        return wait if remaining is None else min(wait, remaining)


# Transient failures: an etcd leader election takes about a second, so back
# off up to one second between tries.
_TRANSIENT_WAIT = wait_random_exponential(multiplier=0.05, max=1.0)

# Conflicts: the loser already holds the fresh value, from the failed
# transaction itself, so it retries at once. Waiting first would only make
# that value stale: against a writer in a tight loop, a loser that slept
# lost every race, for ever. No lockstep can follow either, since every
# round of a conflict has exactly one winner.
_CONFLICT_WAIT = wait_none()


def _retryable(write: bool) -> Callable[[BaseException], bool]:
    def predicate(exc: BaseException) -> bool:
        if isinstance(exc, OutcomeUnknownError):
            # A write is never retried blindly; only the resolving
            # transaction of the exactly-once commit may follow it.
            return not write
        return isinstance(exc, EtcdUnavailableError)

    return predicate


def is_transient(exc: BaseException, *, write: bool) -> bool:
    """Whether `retry_transient` would try again after ``exc``."""
    return _retryable(write)(exc)


def retry_transient(deadline: Deadline, *, write: bool, sleep: Sleep = time.sleep) -> Retrying:
    """The policy for one request while etcd is unavailable.

    Args:
        deadline: When to stop retrying and re-raise the last error.
        write: Whether the request can change etcd. Writes are retried only
            when the error proves they were not applied.
        sleep: Injectable for tests.

    Returns:
        A tenacity `Retrying` that re-raises the last error when it stops.
    """
    return Retrying(
        retry=retry_if_exception(_retryable(write)),
        stop=lambda _state: deadline.expired(),
        wait=_wait_within(_TRANSIENT_WAIT, deadline),
        sleep=sleep,
        reraise=True,
    )


def retry_conflicts(
    attempt: Callable[[], T | None],
    deadline: Deadline,
    *,
    give_up: Callable[[int], BaseException],
    sleep: Sleep = time.sleep,
) -> T:
    """Repeat ``attempt`` until it returns a result, or the deadline passes.

    Args:
        attempt: One optimistic try; returns None when it lost a race.
            Any exception it raises propagates at once.
        deadline: When to give up.
        give_up: Builds the exception raised on giving up, from the number
            of attempts made.
        sleep: Injectable for tests.

    Returns:
        The first result that is not None.
    """

    def raise_give_up(state: RetryCallState) -> T:
        raise give_up(state.attempt_number)

    policy = Retrying(
        retry=retry_if_result(lambda result: result is None),
        stop=lambda _state: deadline.expired(),
        wait=_wait_within(_CONFLICT_WAIT, deadline),
        sleep=sleep,
        retry_error_callback=raise_give_up,
    )
    return cast(T, policy(attempt))
