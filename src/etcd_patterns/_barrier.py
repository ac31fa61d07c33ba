"""Barriers: processes wait until whoever raised the barrier lowers it.

Protocol, that of etcd's Go ``recipe.Barrier``, on the same key, so that the
two work together:

* `Barrier.hold` raises the barrier: it creates the key ``name``, only if it
  does not exist, through the exactly-once commit. With a ``ttl``, the key
  carries a session lease of that TTL, so that the barrier comes down by
  itself within the TTL if the holder's process dies; without, it stays up
  until someone lowers it.
* `Barrier.release` lowers it: it deletes the key, through the exactly-once
  commit too, so that a late copy never lowers a barrier raised since.
* `Barrier.wait` reads the key; if it exists, it watches it, and only it,
  until it is deleted, then reads again.

Guarantees:

* Waiters return once the key is gone, at the latest one watch event and
  one read after its deletion; a barrier that is down does not make anyone
  wait.
* Every wait is bounded by its ``timeout``, then raises
  `BarrierTimeoutError`.

Cost: `hold` and `release` are one round trip each; `wait` on a lowered
barrier is one, on a raised one, one read, one watch and one more read.

Lease loss: a barrier held with a ``ttl`` comes down when its lease is lost,
like a lock; one held without stays up until released.
"""

from __future__ import annotations

import os
import socket
from typing import Any, NamedTuple

from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from . import _ops as ops
from ._commit import commit
from ._errors import BarrierTimeoutError
from ._keys import Keyspace
from ._retry import Deadline, check_timeout
from ._session import Sessions, check_ttl
from ._transport import Transport
from ._wait import Watch, wait

_DELETE = kv_pb2.Event.DELETE


class _Up(NamedTuple):
    """The barrier's key (keys only), None if it is down, and the revision read."""

    kv: Any | None
    revision: int


class Barrier:
    """A barrier that processes wait on until it is lowered; `EtcdPatterns.barrier` makes one.

    Attributes:
        name: The barrier's key, without the namespace.
    """

    def __init__(
        self, transport: Transport, keyspace: Keyspace, sessions: Sessions, name: object
    ) -> None:
        self._raw = keyspace.encode(name, name="barrier name")
        self.name = keyspace.decode(self._raw)
        self._transport = transport
        self._sessions = sessions

    def __repr__(self) -> str:
        return f"<Barrier {self.name!r}>"

    def hold(self, *, ttl: float | None = None) -> bool:
        """Raise the barrier: one round trip.

        Args:
            ttl: If given, the barrier comes down by itself within ``ttl``
                seconds once this process dies (its key carries a session
                lease); if None, it stays up until `release`.

        Returns:
            Whether this call raised it; False if it was already up.
        """
        lease_ttl = None if ttl is None else check_ttl(ttl)
        holder = f"{socket.gethostname()} pid={os.getpid()}".encode()
        committed = commit(
            self._transport,
            lambda: self._sessions.get(lease_ttl),
            compare=[ops.compare_version(self._raw, "==", 0)],
            success=lambda session: [
                ops.put(self._raw, holder, lease=session.lease_id if ttl is not None else 0)
            ],
            failure=[],
        )
        return committed.succeeded

    def release(self) -> None:
        """Lower the barrier, whoever raised it, and let every waiter go: one round trip.

        Exactly once: a copy of the delete that etcd receives late, after
        its answer was lost, never lowers a barrier raised since.
        """
        commit(
            self._transport,
            self._sessions.get,
            compare=[],
            success=[ops.delete(self._raw)],
            failure=[],
        )

    def is_held(self) -> bool:
        """Whether the barrier is up: one round trip."""
        return self._read().kv is not None

    def wait(self, *, timeout: float | None = None) -> None:
        """Block until the barrier is down.

        Args:
            timeout: How long to wait; None waits forever.

        Raises:
            BarrierTimeoutError: Still up after ``timeout`` (a `TimeoutError`).
        """
        deadline = Deadline(check_timeout(timeout))

        def watch(state: _Up) -> Watch | None:
            if state.kv is None:
                return None
            create = etcdrpc.WatchCreateRequest(
                key=self._raw, filters=[etcdrpc.WatchCreateRequest.NOPUT]
            )
            return Watch([create], lambda event: event.type == _DELETE)

        wait(
            self._transport,
            self._read(),
            read=self._read,
            watch=watch,
            deadline=deadline,
            timeout_error=lambda: BarrierTimeoutError(f"barrier {self.name!r} is still up"),
        )

    def _read(self) -> _Up:
        response = self._transport.range(ops.range_request(self._raw, keys_only=True))
        (kv,) = response.kvs or [None]
        return _Up(kv, response.header.revision)
