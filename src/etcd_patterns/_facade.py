"""`EtcdPatterns`: the facade that builds the patterns and owns their session.

An instance is safe to share between threads. It owns one session (a lease
plus keepalive thread), created on first use, and, when made by `connect`,
its etcd3 client. `close` releases all of it and is idempotent. Instances
left open are closed at interpreter exit, while every thread still runs:
their leases are revoked and their gRPC channels closed in order, rather
than torn down half-way by the interpreter's finalization.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Callable, Generator, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

from ._barrier import Barrier
from ._connect import build_client, parse_endpoints
from ._contend import Contender, list_contenders
from ._double_barrier import DoubleBarriered, DoubleBarriers
from ._election import Elected, Elections, LeaderInfo
from ._errors import InvalidArgumentError
from ._fence import Fence
from ._keys import Keyspace
from ._kv import KeyValue, Transform, TryTransformResult
from ._lock import Locked, Locks, TryLocked, TryLockResult
from ._members import Groups, Joined
from ._partition import Partitioned
from ._queue import PREFETCH, REDELIVERY_DELAY, Claim, Queue, QueuedItem, QueueStats
from ._retry import check_count, check_timeout
from ._rwlock import READ, WRITE, RWLocked, RWLocks
from ._semaphore import Semaphored, Semaphores
from ._session import Sessions, check_ttl
from ._transport import DEFAULT_MAX_REQUEST_BYTES, Transport
from ._watch import Watcher

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0
DEFAULT_SESSION_TTL = 10

log = logging.getLogger("etcd_patterns")

# Instances not yet closed, for the exit hook.
_open_instances: weakref.WeakSet[EtcdPatterns] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for instance in list(_open_instances):
        try:
            instance.close()
        except Exception as exc:  # exiting: nothing must be printed
            log.debug("could not close %r at exit: %s", instance, exc)


def _check_request_timeout(timeout: object) -> float:
    wait = check_timeout(timeout)
    if wait is None or wait <= 0:
        raise InvalidArgumentError(f"timeout must be a number of seconds > 0, not {timeout!r}")
    return wait


class EtcdPatterns:
    """Coordination patterns on etcd v3.

    Wraps an existing python3-etcd3 client, which stays the caller's: `close`
    does not close it. To have the instance create and own its client, use
    `EtcdPatterns.connect`.

    Args:
        client: An ``etcd3.MultiEndpointEtcd3Client`` or ``etcd3.Etcd3Client``.
        namespace: A prefix added to every key, e.g. ``"/app/"``.
        timeout: The longest any single request to etcd may take, retries
            of transient failures included, before `EtcdUnavailableError`.
        session_ttl: The TTL in seconds of the instance's session lease:
            how soon etcd frees what a crashed process held.
        max_request_bytes: The server's ``--max-request-bytes``. Larger
            writes fail with `ValueTooLargeError` before anything is sent.
        prefetch: How many queue heads `dequeue` reads at once and then
            takes one per call (default 16); 1 reads before every take.

    Example:
        >>> with EtcdPatterns.connect("127.0.0.1:2379", namespace="/app/") as etcd:
        ...     etcd.transform("visits", lambda v: str(int(v) + 1), default="0")
    """

    def __init__(
        self,
        client: Any,
        *,
        namespace: str | bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        session_ttl: float = DEFAULT_SESSION_TTL,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        prefetch: int = PREFETCH,
    ) -> None:
        self._setup(
            client,
            owns_client=False,
            credentials=None,
            prefetch=prefetch,
            namespace=namespace,
            timeout=timeout,
            session_ttl=session_ttl,
            max_request_bytes=max_request_bytes,
        )

    def _setup(
        self,
        client: Any,
        *,
        owns_client: bool,
        credentials: tuple[str, str] | None,
        namespace: object,
        timeout: object,
        session_ttl: object,
        max_request_bytes: object,
        prefetch: object,
    ) -> None:
        wait = _check_request_timeout(timeout)
        ttl = check_ttl(session_ttl, name="session_ttl")
        max_request_bytes = check_count(max_request_bytes, name="max_request_bytes")
        prefetch = check_count(prefetch, name="prefetch")
        self._keyspace = Keyspace(namespace)
        self._transport = Transport(
            client,
            timeout=wait,
            owns_client=owns_client,
            max_request_bytes=max_request_bytes,
            credentials=credentials,
        )
        self._sessions = Sessions(self._transport, self._keyspace, ttl)
        self._kv = KeyValue(self._transport, self._keyspace, self._sessions.get)
        self._locks = Locks(self._transport, self._keyspace, self._sessions)
        self._elections = Elections(self._transport, self._keyspace, self._sessions)
        self._semaphores = Semaphores(self._transport, self._keyspace, self._sessions)
        self._rwlocks = RWLocks(self._transport, self._keyspace, self._sessions)
        self._double_barriers = DoubleBarriers(self._transport, self._keyspace, self._sessions)
        self._queue = Queue(self._transport, self._keyspace, self._sessions, prefetch=prefetch)
        self._groups = Groups(self._transport, self._keyspace, self._sessions)
        self._watcher = Watcher(self._transport, self._keyspace, self._kv)
        _open_instances.add(self)

    @classmethod
    def connect(
        cls,
        endpoints: str | Sequence[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        namespace: str | bytes | None = None,
        session_ttl: float = DEFAULT_SESSION_TTL,
        ca_cert: str | None = None,
        cert_key: str | None = None,
        cert_cert: str | None = None,
        user: str | None = None,
        password: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        prefetch: int = PREFETCH,
    ) -> EtcdPatterns:
        """Connect to etcd with a client that the instance owns and closes.

        Args:
            endpoints: ``"host:port"`` strings, as a list or one
                comma-separated string. With several, requests fail over
                between them. None reads ``ETCD_ENDPOINTS``, and falls back
                to ``127.0.0.1:2379``.
            timeout: See `EtcdPatterns`. Also bounds authentication.
            namespace: See `EtcdPatterns`.
            session_ttl: See `EtcdPatterns`.
            ca_cert: Path of the CA certificate; enables TLS.
            cert_key: Path of the client key, for client-certificate auth.
            cert_cert: Path of the client certificate.
            user: User name for etcd authentication.
            password: Password for etcd authentication.
            max_request_bytes: See `EtcdPatterns`.
            prefetch: See `EtcdPatterns`.

        Returns:
            A connected instance. No request is sent until it is used,
            unless ``user`` is given.

        Raises:
            InvalidArgumentError: Malformed endpoints or inconsistent TLS or
                credential arguments.
            EtcdUnavailableError: Authentication could not reach etcd.
            PermissionDeniedError: The credentials were refused.
        """
        wait = _check_request_timeout(timeout)
        client = build_client(
            parse_endpoints(endpoints),
            timeout=wait,
            ca_cert=ca_cert,
            cert_key=cert_key,
            cert_cert=cert_cert,
            user=user,
            password=password,
        )
        self = cls.__new__(cls)
        try:
            self._setup(
                client,
                owns_client=True,
                credentials=None if user is None or password is None else (user, password),
                namespace=namespace,
                timeout=wait,
                session_ttl=session_ttl,
                max_request_bytes=max_request_bytes,
                prefetch=prefetch,
            )
        except BaseException:
            client.close()
            raise
        return self

    # -- lifetime -----------------------------------------------------------

    def close(self) -> None:
        """Release everything this instance created. Idempotent, and silent.

        Stops the keepalive thread, revokes the session lease (deleting the
        keys it carries), and closes the etcd3 client if `connect` made it.
        Afterwards every method raises `ClosedError`.
        """
        _open_instances.discard(self)
        self._sessions.close()
        self._transport.close()

    def __enter__(self) -> EtcdPatterns:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self._transport.closed else ""
        return (
            f"<EtcdPatterns endpoints={','.join(self._transport.endpoints)} "
            f"namespace={self._keyspace.prefix.decode()!r}{state}>"
        )

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The ``host:port`` of each etcd endpoint in use."""
        return self._transport.endpoints

    @property
    def namespace(self) -> str:
        """The prefix added to every key ("" for none)."""
        return self._keyspace.prefix.decode("utf-8")

    # -- key-value patterns -------------------------------------------------

    def get_values(self, key: str | bytes) -> list[str]:
        """Read a key, or the values of a directory of keys.

        Cost: one round trip, reading one consistent snapshot.

        Args:
            key: The key, without the namespace.

        Returns:
            ``[value]`` if ``key`` holds a value; otherwise the values of its
            direct children (``key/child``, not ``key/child/grandchild``) in
            key order; ``[]`` if there are none.

        Raises:
            InvalidArgumentError: ``key`` is empty, ends with ``/``, or is
                not UTF-8.
            InvalidTypeError: ``key`` is not str or bytes.
            ValueDecodeError: A stored value is not UTF-8.
            EtcdUnavailableError: etcd did not answer within ``timeout``.
            ClosedError: The instance is closed.
        """
        return self._kv.get_values(key)

    def watch_values(
        self, key: str | bytes, *, timeout: float | None = None
    ) -> Generator[list[str], None, None]:
        """`get_values` now, then again after every change of the key or of its direct children.

        ``for values in etcd.watch_values("config"): apply(values)``

        Changes in between may coalesce, but the latest state is always
        yielded, and every state yielded is one that etcd held. It goes on
        across failover and compaction, reading again when its watch breaks.
        It holds no thread: it runs while you iterate, and stops when the
        iterator is closed. Cost: one read and one watch stream to begin,
        then one read per change.

        Args:
            key: The key, or directory, without the namespace.
            timeout: How long to wait for each next change; None waits
                forever.

        Raises:
            WatchTimeoutError: No change within ``timeout`` (a
                `TimeoutError`), raised by the iterator.
            ValueDecodeError: A stored value is not UTF-8.
        """
        return self._watcher.watch_values(key, timeout=timeout)

    def try_transform(
        self,
        key: str | bytes,
        fn: Transform,
        *,
        default: str | bytes | None = None,
        guard: Fence | None = None,
    ) -> TryTransformResult:
        """Atomically replace the value with ``fn(value)``, in one attempt.

        Reads the value, computes ``fn(value)``, and writes it in one
        transaction guarded by the key's mod revision, keeping the key's
        lease. If another writer changed the key in between, nothing is
        written and the current value comes back from the same transaction.
        Cost: two round trips.

        Args:
            key: The key, without the namespace.
            fn: Maps the current value to the new one. It must return `str`.
            default: If given and the key has no value, ``fn(default)`` is
                written, but only while the key is still absent. Without
                it, a missing key raises `KeyNotFoundError`.
            guard: A `Fence`: a held lock (from `locked` or `try_locked`)
                or a claimed item (from `claim`). The write then also
                requires that this holder still holds it.

        Returns:
            ``(True, new_value)`` if written; ``(False, current_value)`` if
            another writer got in first (``default`` if the key is gone).

        Raises:
            KeyNotFoundError: The key has no value and there is no default.
            NotAValueError: The key is a directory.
            InvalidTypeError: ``fn`` is not callable, or returned a non-`str`.
            ValueTooLargeError: The new value exceeds etcd's request limit.
            LockLostError: ``guard``'s lock is no longer held; nothing written.
            ClaimLostError: ``guard``'s claim is gone; nothing written.
            EtcdUnavailableError: etcd did not answer within ``timeout``.
            OutcomeUnknownError: The write's answer was lost and the session
                lease that could tell whether it applied was lost too.

        Any exception raised by ``fn`` propagates. Nothing is written unless
        the call returns ``(True, ...)``.
        """
        return self._kv.try_transform(key, fn, default=default, guard=guard)

    def transform(
        self,
        key: str | bytes,
        fn: Transform,
        *,
        default: str | bytes | None = None,
        timeout: float | None = None,
        guard: Fence | None = None,
    ) -> str:
        """Atomically replace the value with ``fn(value)``, retrying on conflict.

        Like `try_transform`, but when another writer gets in first, ``fn``
        is applied again to the value that writer left (which the losing
        transaction already returned, so each conflict costs one round
        trip), after a short random backoff. ``fn`` may be called several
        times: it must be a pure function of its argument.

        Args:
            key: The key, without the namespace.
            fn: Maps the current value to the new one. It must return `str`.
            default: As for `try_transform`.
            timeout: How long to keep retrying conflicts; None for no limit.
            guard: As for `try_transform`.

        Returns:
            The value written.

        Raises:
            ConflictError: Other writers kept winning until ``timeout``
                (a `TimeoutError`).
            EtcdPatternsError: The other errors of `try_transform`, in the
                same cases.
        """
        return self._kv.transform(key, fn, default=default, timeout=timeout, guard=guard)

    # -- locks --------------------------------------------------------------

    def lock(
        self,
        key: str | bytes,
        block: Callable[[], T],
        *,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> T:
        """Run ``block`` while holding the cluster-wide lock ``key``.

        Waits for the lock (first come, first served), runs ``block()``, and
        releases the lock in a ``finally``. The protocol is etcd's own, so
        ``etcdctl lock key`` and Go's ``concurrency.Mutex`` exclude, and are
        excluded by, this lock. Cost: two round trips uncontended.

        Args:
            key: The lock's name, without the namespace. Its contenders'
                keys live under ``key/``.
            block: Called with no arguments while the lock is held.
            ttl: Lease TTL in seconds: how soon the lock is freed if this
                process dies. None uses the instance's ``session_ttl``. The
                block may run longer: the lease is kept alive meanwhile.
            timeout: How long to wait for the lock; None waits forever.

        Returns:
            What ``block`` returned. If it raised, the exception propagates
            after the lock is released.

        Raises:
            LockTimeoutError: Not acquired within ``timeout`` (a
                `TimeoutError`). The block did not run.
            LockLostError: The lock was lost while the block ran (its lease
                expired or was revoked); the block's result is attached.
            LockReentryError: This thread already holds ``key``.
            NotALockError: ``key`` itself holds a value.
            EtcdUnavailableError: etcd did not answer within ``timeout``
                of the instance.
        """
        result: T = self._locks.lock(key, block, ttl=ttl, timeout=timeout)
        return result

    def try_lock(
        self, key: str | bytes, block: Callable[[], T], *, ttl: float | None = None
    ) -> TryLockResult[T]:
        """Run ``block`` under the lock ``key`` only if nobody holds it now.

        One round trip when the lock is held elsewhere (and nothing is
        written then); two for an acquire-and-release.

        Returns:
            ``(revision, acquired, value)``: ``acquired`` is False, and the
            block not run, if the lock was held; otherwise ``value`` is the
            block's result. ``revision`` is the etcd revision of the attempt.

        Raises:
            LockLostError: The lock was lost while the block ran.
            EtcdPatternsError: The other errors of `lock`, but for the
                timeout, in the same cases.
        """
        result: TryLockResult[T] = self._locks.try_lock(key, block, ttl=ttl)
        return result

    def locked(
        self, key: str | bytes, *, ttl: float | None = None, timeout: float | None = None
    ) -> Locked:
        """Hold the lock ``key`` for a ``with`` block.

        ``with etcd.locked("jobs") as held:`` either holds the lock or
        raises (`LockTimeoutError` and the others of `lock`). ``held`` is a
        `HeldLock` with the holder's ``key``, its ``fencing_token``,
        ``is_owner()``, the ``lost`` event and ``guard()``. Leaving the block
        releases the lock, and raises `LockLostError` if it had been lost
        (unless the block is already raising).
        """
        return Locked(self._locks, key, ttl, timeout)

    def try_locked(self, key: str | bytes, *, ttl: float | None = None) -> TryLocked:
        """Hold the lock ``key`` for a ``with`` block, if nobody holds it now.

        ``with etcd.try_locked("jobs") as held:`` gives a `HeldLock`, or None
        if the lock is held elsewhere (one round trip, nothing written).
        """
        return TryLocked(self._locks, key, ttl)

    # -- read-write lock ----------------------------------------------------

    def read_locked(
        self, name: str | bytes, *, ttl: float | None = None, timeout: float | None = None
    ) -> RWLocked:
        """Hold the read-write lock ``name`` as a reader, for a ``with`` block.

        Readers share the lock; a writer excludes them. Fair: a reader that
        arrives after a waiting writer waits for it. The key layout is that
        of etcd's Go ``recipe.RWMutex`` (``name/read/…``, ``name/write/…``),
        so that it and this lock exclude each other. Cost: two round trips
        uncontended.

        ``held`` is a `HeldRWLock`, a `Fence`. Leaving the block releases
        the lock, and raises `LockLostError` if it had been lost (unless the
        block is already raising).

        Raises:
            LockTimeoutError: Not acquired within ``timeout`` (a
                `TimeoutError`); no key is left behind.
            LockReentryError: This thread already holds ``name``, in either
                mode.
            NotALockError: ``name`` holds a value, or data without a lease
                lies under it.
        """
        return RWLocked(self._rwlocks, name, READ, ttl, timeout)

    def write_locked(
        self, name: str | bytes, *, ttl: float | None = None, timeout: float | None = None
    ) -> RWLocked:
        """Hold the read-write lock ``name`` as its one writer, for a ``with`` block.

        A writer excludes readers and other writers, and waits only for the
        readers and writers that registered before it. Otherwise as
        `read_locked`.
        """
        return RWLocked(self._rwlocks, name, WRITE, ttl, timeout)

    # -- barriers -----------------------------------------------------------

    def barrier(self, name: str | bytes) -> Barrier:
        """The barrier ``name``, which processes wait on until it is lowered.

        `Barrier.hold` raises it, `Barrier.release` lowers it, and
        `Barrier.wait` blocks until it is down. The protocol is that of
        etcd's Go ``recipe.Barrier``, on the same key. Making the object
        sends nothing.

        Raises:
            InvalidArgumentError: ``name`` is not a usable key.
        """
        return Barrier(self._transport, self._keyspace, self._sessions, name)

    def double_barrier(
        self,
        name: str | bytes,
        count: int,
        *,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> DoubleBarriered:
        """Enter the double barrier ``name`` with ``count`` participants, for a ``with`` block.

        Entering waits until ``count`` participants have entered; leaving
        the block waits until all of them have left. The same name runs
        round after round: a participant that arrives during a round waits
        for the next. A block that raises breaks the round: the others get
        `BarrierBrokenError`, as they do when a participant's process dies
        (within its ``ttl``).

        Args:
            name: The double barrier's name, without the namespace; its keys
                live under ``name/``.
            count: How many participants a round has.
            ttl: Lease TTL in seconds: how soon a dead participant is
                noticed. None uses the instance's ``session_ttl``.
            timeout: How long entering, and then leaving, may each wait;
                None waits forever.

        Raises:
            BarrierFullError: The round already has ``count`` participants.
            BarrierBrokenError: A participant died or gave up mid-round.
            BarrierTimeoutError: Entering or leaving took longer than
                ``timeout`` (a `TimeoutError`).
        """
        return DoubleBarriered(
            self._double_barriers, self._keyspace, name=name, count=count, ttl=ttl, timeout=timeout
        )

    # -- semaphore, and who queues --------------------------------------------

    def semaphore(
        self,
        name: str | bytes,
        limit: int,
        *,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> Semaphored:
        """Hold one of ``limit`` permits of the semaphore ``name`` for a ``with`` block.

        ``with etcd.semaphore("encoders", 3) as permit:`` waits (first come,
        first served) until fewer than ``limit`` contenders registered
        before this one hold permits, and gives the permit back on leaving
        the block. Cost: two round trips uncontended.

        ``permit`` is a `Permit`, a `Fence`: its ``fencing_token``,
        ``lost`` event, ``is_owner()``, and ``guard=permit`` for writes that
        must apply only while it is held.

        Args:
            name: The semaphore's name, without the namespace. Contenders'
                keys live under ``name/``; the limit is recorded at ``name``.
            limit: How many permits there are. Every contender must pass the
                same limit.
            ttl: Lease TTL in seconds: how soon a crashed holder's permit
                comes back. None uses the instance's ``session_ttl``.
            timeout: How long to wait for a permit; None waits forever.

        Raises:
            SemaphoreTimeoutError: No permit within ``timeout`` (a
                `TimeoutError`); no key is left behind.
            SemaphoreLimitError: Other contenders use another ``limit``;
                nothing was written.
            LockLostError: On leaving the block, the permit had been lost
                (its lease expired or was revoked), unless the block is
                already raising.
            NotALockError: ``name`` holds a value that is not a limit, or
                data without a lease lies under it.
        """
        return Semaphored(self._semaphores, name, limit, ttl, timeout)

    def contenders(self, name: str | bytes) -> list[Contender]:
        """The keys queued under a lock, semaphore or election ``name``: one round trip.

        Oldest first: the first is the lock's holder or the election's
        leader; a semaphore's first ``limit`` hold its permits. Each carries
        its key, value, lease and create revision, for operators to see who
        holds and who waits.
        """
        raw = self._keyspace.encode(name, name="name", trailing_slash=True)
        return list_contenders(self._transport, self._keyspace, raw)

    # -- election -----------------------------------------------------------

    def elected(
        self,
        name: str | bytes,
        value: str | bytes,
        *,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> Elected:
        """Lead the election ``name`` for a ``with`` block.

        ``with etcd.elected("scheduler", "host-1") as leadership:`` campaigns
        with ``value`` as this candidate's proposal, waits until elected
        (first come, first served), and resigns on leaving the block. The
        protocol is etcd's own, so ``etcdctl elect`` and Go's
        ``concurrency.Election`` take part in the same election. Cost: two
        round trips uncontended, campaign and resignation.

        ``leadership`` is a `Leadership`, a `Fence`: its ``fencing_token``,
        ``lost`` event, ``is_leader()``, ``proclaim(value)``, and
        ``guard=leadership`` for writes that must apply only while it leads.

        Args:
            name: The election's name, without the namespace. Candidates'
                keys live under ``name/``.
            value: What this candidate proposes, e.g. its address: the
                leader's value, as `leader` and `observe` report it.
            ttl: Lease TTL in seconds: how soon another candidate is elected
                if this process dies. None uses the instance's
                ``session_ttl``. The block may run longer: the lease is kept
                alive meanwhile.
            timeout: How long to wait to be elected; None waits forever.

        Raises:
            ElectionTimeoutError: Not elected within ``timeout`` (a
                `TimeoutError`); no key is left behind.
            LeadershipLostError: On leaving the block, the leadership had
                been lost (its lease expired or was revoked), unless the
                block is already raising.
            NotAnElectionError: ``name`` holds a value, or data without a
                lease lies under it; nothing was written.
            EtcdUnavailableError: etcd did not answer within ``timeout`` of
                the instance.
        """
        return Elected(self._elections, name, value, ttl, timeout)

    def leader(self, name: str | bytes) -> LeaderInfo | None:
        """The current leader of the election ``name``, or None: one round trip.

        Returns:
            ``(key, value, fencing_token)`` of the oldest candidate, whether
            it campaigned through this library or ``etcdctl elect``.

        Raises:
            NotAnElectionError: Data without a lease lies under ``name/``.
        """
        return self._elections.leader(name)

    def observe(
        self, name: str | bytes, *, timeout: float | None = None
    ) -> Generator[LeaderInfo | None, None, None]:
        """Follow the leader of the election ``name``.

        Yields the current leader first (None if there is none), then the
        leader after each change: a new leader, a proclaimed value, or no
        leader. States in between may coalesce, but the latest is never
        missed. Each change costs one watch and one read; nothing is held
        in etcd, so the iterator can be dropped at any time.

        Args:
            name: The election's name, without the namespace.
            timeout: How long to wait for each next change; None waits
                forever.

        Raises:
            ElectionTimeoutError: No change within ``timeout`` (a
                `TimeoutError`), raised by the iterator.
            NotAnElectionError: Data without a lease lies under ``name/``.
        """
        return self._elections.observe(name, timeout=timeout)

    # -- membership ----------------------------------------------------------

    def member(
        self,
        group: str | bytes,
        member_id: str | bytes,
        value: str | bytes = "",
        *,
        ttl: float | None = None,
    ) -> Joined:
        """Be a member of ``group`` inside a ``with`` block.

        ``with etcd.member("workers", "w1", "10.0.0.7:8080") as me: ...``

        Joining creates the key ``group/member_id`` on the session lease,
        holding ``value``; leaving the block deletes it, and a process that
        dies leaves within ``ttl`` seconds (default: the instance's
        ``session_ttl``). The `Member` is a `Fence`; ``me.update(value)``
        advertises another value. Cost: one round trip to join, one to leave.

        Raises:
            MemberExistsError: The group has a member of this id, or the
                key of that name holds data (it carries no lease); nothing
                was written.
            InvalidArgumentError: ``member_id`` is empty or contains ``/``.
            MembershipLostError: On leaving the block, if the membership was
                lost in it (its lease expired).
        """
        return Joined(self._groups, group, member_id, value, ttl)

    def members(self, group: str | bytes) -> dict[str, str]:
        """The members of ``group``, each id with its value: one round trip.

        A member is a direct child of ``group`` on a lease; a key there
        without a lease is data, and is not listed.
        """
        return self._groups.members(group)

    def watch_members(
        self, group: str | bytes, *, timeout: float | None = None
    ) -> Generator[dict[str, str], None, None]:
        """`members` now, then after each change of the group, as `watch_values` follows a key.

        Raises:
            WatchTimeoutError: No change within ``timeout`` (a
                `TimeoutError`), raised by the iterator.
        """
        return self._groups.watch_members(group, timeout=timeout)

    def partitioner(
        self,
        group: str | bytes,
        member_id: str | bytes,
        items: Sequence[str],
        *,
        ttl: float | None = None,
    ) -> Partitioned:
        """Share ``items`` among the live members of ``group``, inside a ``with`` block.

        ``with etcd.partitioner("shards", "w1", shard_ids) as part: ...``

        Joining makes this process a member, as `member` does; each item is
        owned by one member under rendezvous hashing over the members of
        one read. ``part.owned()`` is this member's share (one round trip);
        ``part.changes()`` yields it now and whenever it changes;
        ``part.lock(item)`` is a lock for one item, for a safe handover.

        Raises:
            MemberExistsError: The group has a member of this id, or the
                key of that name holds data.
            InvalidTypeError, InvalidArgumentError: ``items`` is not a list
                of distinct str; nothing was written.
        """
        return Partitioned(
            self._groups,
            group,
            member_id,
            items,
            ttl=ttl,
            locked=lambda name, timeout: self.locked(name, ttl=ttl, timeout=timeout),
        )

    # -- queue --------------------------------------------------------------

    def enqueue(
        self,
        dir_key: str | bytes,
        value: str | bytes,
        *,
        ttl: float | None = None,
        priority: int = 0,
    ) -> str:
        """Append ``value`` to the queue ``dir_key``.

        Exactly once, even if etcd's answer is lost. Cost: one round trip
        (two with ``ttl``, which grants the item's lease).

        Args:
            dir_key: The queue's name, without the namespace. Items are its
                direct children.
            value: The item.
            ttl: If given, the item carries a lease of this many seconds and
                vanishes, undelivered, when it expires.
            priority: From -1000 to 1000; lower is served first, and equal
                priorities in enqueue order.

        Returns:
            The item's key, without the namespace.

        Raises:
            NotAValueError: ``dir_key`` itself holds a value.
            InvalidArgumentError, InvalidTypeError, ValueTooLargeError: Bad
                input; nothing was written.
        """
        return self._queue.enqueue(dir_key, value, ttl=ttl, priority=priority)

    def enqueue_many(
        self,
        dir_key: str | bytes,
        values: Sequence[str | bytes],
        *,
        ttl: float | None = None,
        priority: int = 0,
    ) -> list[str]:
        """Append several values, in order, at one priority: one transaction per 60 values.

        Large values go fewer to a transaction: each carries at most half of
        etcd's request limit (``max_request_bytes``).

        Each transaction is exactly once, but the call is not atomic: if a
        later one fails, the earlier ones stay enqueued, and the error's
        note (``__notes__``) says which values were.

        Returns:
            The items' keys, in order.

        Raises:
            EtcdPatternsError: As `enqueue` raises, in the same cases.
        """
        return self._queue.enqueue_many(dir_key, values, ttl=ttl, priority=priority)

    @overload
    def dequeue(
        self,
        dir_key: str | bytes,
        *,
        timeout: float | None = None,
        decode: Literal[True] = True,
        dead_letter: str | bytes | None = None,
    ) -> str: ...

    @overload
    def dequeue(
        self,
        dir_key: str | bytes,
        *,
        timeout: float | None = None,
        decode: Literal[False],
        dead_letter: str | bytes | None = None,
    ) -> bytes: ...

    def dequeue(
        self,
        dir_key: str | bytes,
        *,
        timeout: float | None = None,
        decode: bool = True,
        dead_letter: str | bytes | None = None,
    ) -> str | bytes:
        """Remove and return the first available item; exactly one caller gets it.

        Items are served by priority, then in enqueue order. Waits, on a
        watch, while the queue has nothing available. Cost: one round trip
        per item, plus one to read a batch of 16 candidate heads.

        Args:
            dir_key: The queue's name.
            timeout: How long to wait for an item: None waits forever, 0
                does not wait.
            decode: Return `str`; an item that is not UTF-8 is then moved
                to the dead-letter queue (logged at WARNING), so that it
                never blocks the items behind it. False returns the stored
                `bytes`, whatever they are.
            dead_letter: The dead-letter queue; default ``dir_key + ".dead"``.

        Returns:
            The item's value.

        Raises:
            QueueEmptyError: No item within ``timeout`` (a `TimeoutError`).
            NotAValueError: ``dir_key`` itself holds a value.
        """
        return self._queue.dequeue(dir_key, timeout=timeout, decode=decode, dead_letter=dead_letter)

    @overload
    def dequeue_many(
        self,
        dir_key: str | bytes,
        max_items: int,
        *,
        timeout: float | None = None,
        decode: Literal[True] = True,
        dead_letter: str | bytes | None = None,
    ) -> list[str]: ...

    @overload
    def dequeue_many(
        self,
        dir_key: str | bytes,
        max_items: int,
        *,
        timeout: float | None = None,
        decode: Literal[False],
        dead_letter: str | bytes | None = None,
    ) -> list[bytes]: ...

    def dequeue_many(
        self,
        dir_key: str | bytes,
        max_items: int,
        *,
        timeout: float | None = None,
        decode: bool = True,
        dead_letter: str | bytes | None = None,
    ) -> list[str] | list[bytes]:
        """Remove and return between 1 and ``max_items`` of the first available items.

        Waits like `dequeue` for the first item. Its first read fetches
        ``max_items`` heads; it then takes them 60 per transaction, with
        the same exactly-once guarantee, and returns what was there.
        ``decode`` and ``dead_letter`` are as for `dequeue`.

        Raises:
            InvalidArgumentError: ``max_items`` < 1.
            QueueEmptyError: No item within ``timeout``.
            NotAValueError: ``dir_key`` itself holds a value.
        """
        return self._queue.dequeue_many(
            dir_key, max_items, timeout=timeout, decode=decode, dead_letter=dead_letter
        )

    def claim(
        self,
        dir_key: str | bytes,
        *,
        ttl: float | None = None,
        timeout: float | None = None,
        max_deliveries: int | None = None,
        dead_letter: str | bytes | None = None,
        redelivery_delay: float = REDELIVERY_DELAY,
        decode: bool = True,
    ) -> Claim:
        """Process the first available item at least once, surviving a crash.

        ``with etcd.claim("jobs") as item: process(item.value)``

        While claimed, the item stays in place but no other consumer sees
        it. Leaving the block normally acks the item (item, claim and
        record are deleted in one transaction); an exception releases it,
        with the error recorded, and it is delivered again after
        ``redelivery_delay``, doubled for each delivery it has had, up to
        60 s. `ClaimedItem.ack` and `ClaimedItem.release` settle it inside
        the block. If the process dies, the claim expires with its lease
        after ``ttl`` seconds (default: the instance's ``session_ttl``),
        and the delivery counts.

        Args:
            dir_key: The queue's name.
            ttl: The claim's lease TTL, in seconds.
            timeout: How long to wait for an item.
            max_deliveries: The most times an item is delivered: one due a
                delivery more moves instead, exactly once, to the
                dead-letter queue, with its count and last error. None for
                no limit.
            dead_letter: The dead-letter queue; default ``dir_key + ".dead"``.
            redelivery_delay: Seconds before a released item's first
                redelivery; 0 for none.
            decode: As for `dequeue`: with True, an item that is not UTF-8
                goes to the dead-letter queue; with False, read
                ``item.value_bytes``.

        Raises:
            QueueEmptyError: No item within ``timeout``; the block did not run.
            ClaimLostError: On ack, the claim had expired; nothing was deleted.
            InvalidArgumentError: ``max_deliveries`` < 1, or ``dead_letter``
                is ``dir_key``; raised before anything is sent.
        """
        return self._queue.claim(
            dir_key,
            ttl=ttl,
            timeout=timeout,
            max_deliveries=max_deliveries,
            dead_letter=dead_letter,
            redelivery_delay=redelivery_delay,
            decode=decode,
        )

    def requeue(
        self, dead_letter_dir: str | bytes, dir_key: str | bytes, *, max_items: int | None = None
    ) -> int:
        """Move items from a dead-letter queue back to a queue: one read and one transaction per 30.

        Each item keeps its id (its priority and enqueue time) and starts
        again with no deliveries. Each transaction moves its items exactly
        once, all or none.

        Args:
            dead_letter_dir: The dead-letter queue.
            dir_key: The queue to move them to.
            max_items: The most items to move; None for all.

        Returns:
            How many items were moved.

        Raises:
            InvalidArgumentError: The two queues are the same, or
                ``max_items`` < 1.
            NotAValueError: ``dir_key`` holds a value.
            ConflictError: Consumers of the dead letters kept taking items
                first for one request's time; the error says how many
                were moved.
        """
        return self._queue.requeue(dead_letter_dir, dir_key, max_items=max_items)

    def queue_stats(
        self, dir_key: str | bytes, *, dead_letter: str | bytes | None = None
    ) -> QueueStats:
        """How many items are pending (by priority), in flight, delayed and dead: one round trip.

        Args:
            dir_key: The queue's name.
            dead_letter: Its dead-letter queue; default ``dir_key + ".dead"``.
        """
        return self._queue.stats(dir_key, dead_letter=dead_letter)

    def peek(self, dir_key: str | bytes, n: int = 10) -> list[QueuedItem]:
        """The first ``n`` items in the order they are served, taking none: one round trip.

        Claimed and delayed items are listed too, and marked.
        """
        return self._queue.peek(dir_key, n)
