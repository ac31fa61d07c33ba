"""etcd-patterns: typed, synchronous coordination patterns on etcd v3.

Start with `EtcdPatterns.connect`::

    from etcd_patterns import EtcdPatterns

    with EtcdPatterns.connect("127.0.0.1:2379", namespace="/app/") as etcd:
        etcd.transform("visits", lambda v: str(int(v) + 1), default="0")
        print(etcd.get_values("visits"))

Throwaway etcd servers for tests live in `etcd_patterns.testing`.
"""

from ._barrier import Barrier
from ._contend import Contender
from ._double_barrier import BarrierRound, DoubleBarriered
from ._election import Elected, LeaderInfo, Leadership
from ._errors import (
    BarrierBrokenError,
    BarrierFullError,
    BarrierTimeoutError,
    ClaimLostError,
    ClosedError,
    ConflictError,
    ElectionTimeoutError,
    EtcdError,
    EtcdPatternsError,
    EtcdUnavailableError,
    ForkedProcessError,
    InvalidArgumentError,
    InvalidTypeError,
    KeyNotFoundError,
    LeadershipLostError,
    LeaseNotFoundError,
    LockLostError,
    LockReentryError,
    LockTimeoutError,
    MemberExistsError,
    MembershipLostError,
    NotALockError,
    NotAnElectionError,
    NotAValueError,
    OutcomeUnknownError,
    PermissionDeniedError,
    QueueEmptyError,
    QuotaExceededError,
    SemaphoreLimitError,
    SemaphoreTimeoutError,
    ValueDecodeError,
    ValueTooLargeError,
    WatchTimeoutError,
)
from ._facade import EtcdPatterns
from ._fence import Fence
from ._kv import TryTransformResult
from ._lock import HeldLock, Locked, TryLocked, TryLockResult
from ._members import Joined, Member
from ._partition import Partition, Partitioned
from ._queue import PRIORITY_MAX, PRIORITY_MIN, Claim, ClaimedItem, QueuedItem, QueueStats
from ._rwlock import HeldRWLock, RWLocked
from ._semaphore import Permit, Semaphored

__version__ = "0.1.0"

__all__ = [
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "Barrier",
    "BarrierBrokenError",
    "BarrierFullError",
    "BarrierRound",
    "BarrierTimeoutError",
    "Claim",
    "ClaimLostError",
    "ClaimedItem",
    "ClosedError",
    "ConflictError",
    "Contender",
    "DoubleBarriered",
    "Elected",
    "ElectionTimeoutError",
    "EtcdError",
    "EtcdPatterns",
    "EtcdPatternsError",
    "EtcdUnavailableError",
    "Fence",
    "ForkedProcessError",
    "HeldLock",
    "HeldRWLock",
    "InvalidArgumentError",
    "InvalidTypeError",
    "Joined",
    "KeyNotFoundError",
    "LeaderInfo",
    "Leadership",
    "LeadershipLostError",
    "LeaseNotFoundError",
    "LockLostError",
    "LockReentryError",
    "LockTimeoutError",
    "Locked",
    "Member",
    "MemberExistsError",
    "MembershipLostError",
    "NotALockError",
    "NotAValueError",
    "NotAnElectionError",
    "OutcomeUnknownError",
    "Partition",
    "Partitioned",
    "PermissionDeniedError",
    "Permit",
    "QueueEmptyError",
    "QueueStats",
    "QueuedItem",
    "QuotaExceededError",
    "RWLocked",
    "SemaphoreLimitError",
    "SemaphoreTimeoutError",
    "Semaphored",
    "TryLockResult",
    "TryLocked",
    "TryTransformResult",
    "ValueDecodeError",
    "ValueTooLargeError",
    "WatchTimeoutError",
    "__version__",
]
