"""Leader election on etcd's own election protocol, fenced like a lock.

Protocol: the contender queue of `_contend`, as Go's
``concurrency.Election`` runs it, so that ``etcdctl elect`` and etcd's
server-side Election service take part in the same elections:

* A candidate for election ``name`` writes a key directly under ``name/``,
  carrying its session lease, with its value (its *proposal*: an address,
  a host name) as the key's value.
* The leader is the key with the lowest create revision under ``name/``,
  and its value is the leader's value. Each waiting candidate watches only
  the key created just before its own (no herd).
* `Leadership.proclaim` changes the leader's value, in one transaction
  guarded by the leader key's create revision (only while it still leads)
  and by its mod revision as last written (so that a late copy of an
  earlier proclamation never overwrites a later one).
* Resigning deletes the leader's key, guarded by its create revision, so it
  never deletes the next leader's key.
* An observer reads the oldest key under ``name/``, then watches only that
  key while there is a leader (its value may change, or it may go), or the
  whole directory while there is none, and reads again on every event.

Guarantees:

* While the session lease lives, at most one candidate leads, and
  candidates are elected in the order they campaigned (FIFO).
* A leader's fencing token, the create revision of its key, increases with
  every new leader. A write guarded by the leadership (``transform(...,
  guard=leadership)``) applies only while the leader's key still exists
  with that token: a leader that was paused past its TTL and replaced
  cannot write through the library, and `Leadership.proclaim` raises
  `LeadershipLostError` and writes nothing.
* A campaign that times out, raises or is interrupted leaves no key behind.
* `observe` never misses the latest state: states in between may coalesce,
  but every read is of the current leader, and a read follows every event
  (and at least every `RECHECK_INTERVAL`), across member failover and
  compaction alike.

Lease loss: etcd deletes the leader's key, the next candidate is elected,
and the old leader learns it from ``leadership.lost``, from
`Leadership.is_leader`, and from `LeadershipLostError` on `proclaim`, on
guarded writes, and on leaving the ``with`` block.

Cost: an uncontended elect-and-resign cycle is two round trips; `leader`,
`Leadership.is_leader` and `Leadership.proclaim` are one each. A waiting
candidate pays one watch and one read per candidate ahead of it that leaves;
an observer one watch and one read per change.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, NamedTuple

from etcd3 import etcdrpc

from . import _ops as ops
from ._commit import commit
from ._contend import Contenders, Winner, Won
from ._errors import (
    ConflictError,
    ElectionTimeoutError,
    LeadershipLostError,
    NotAnElectionError,
)
from ._fence import Fence, Holding
from ._keys import Keyspace, children_range, encode_value
from ._retry import Deadline, check_timeout
from ._session import Session, Sessions, check_ttl
from ._transport import Transport
from ._wait import Watch, changes


class LeaderInfo(NamedTuple):
    """An election's leader, as `EtcdPatterns.leader` and `EtcdPatterns.observe` see it.

    Attributes:
        key: The leader's key under ``name/``, without the namespace.
        value: The leader's value (its proposal). Bytes that are not UTF-8,
            which another client may have written, show as backslash escapes.
        fencing_token: The create revision of `key`; it increases with every
            new leader.
    """

    key: str
    value: str
    fencing_token: int


class Leadership(Fence):
    """Leadership of an election, won by this process. A `Fence`.

    Attributes:
        name: The election's name, without the namespace.
        key: The leader's key under ``name/``, without the namespace.
        value: The leader's value: the proposal it campaigned with, or the
            one it last proclaimed.
        fencing_token: The create revision of `key`. It increases with every
            new leader: pass it to a storage system that rejects writes
            carrying an older token.
        lease_id: The session lease that `key` carries.
    """

    def __init__(
        self,
        *,
        elections: Elections,
        name: str,
        key: str,
        value: str,
        etcd_key: bytes,
        fencing_token: int,
        session: Session,
        transport: Transport,
    ) -> None:
        super().__init__(
            etcd_key=etcd_key, fencing_token=fencing_token, session=session, transport=transport
        )
        self.name = name
        self.key = key
        self.value = value
        self._elections = elections
        # The mod revision of the leader's key as this process last wrote it.
        self._mod_revision = fencing_token

    def __repr__(self) -> str:
        return f"<Leadership {self.name!r} key={self.key!r} fencing_token={self.fencing_token}>"

    def is_leader(self) -> bool:
        """Ask etcd whether this process still leads: one round trip.

        The leader's key, once elected, stays the oldest under ``name/`` for
        as long as it exists, so this is `Fence.is_owner`.
        """
        return self.is_owner()

    def proclaim(self, value: str | bytes) -> None:
        """Change the leader's value, only while this process still leads.

        One round trip, exactly once: a copy of the write that etcd
        receives late never overwrites a later proclamation. (If the key
        changed since this process last wrote it, one more round trip reads
        it, and the value is proclaimed over it.)

        Raises:
            LeadershipLostError: This process leads no more; nothing was
                written.
            InvalidArgumentError: ``value`` is not valid UTF-8; nothing was
                written.
            OutcomeUnknownError: etcd's answer was lost and could not be
                settled; a later `proclaim` is still safe.
            ConflictError: Another client kept writing to the leader's key
                for the instance's whole ``timeout``.
        """
        self._elections.proclaim(self, value)

    def _lost_error(self, consequence: str) -> LeadershipLostError:
        return LeadershipLostError(
            f"this process no longer leads election {self.name!r}; {consequence}", name=self.name
        )


class Elections:
    """The election pattern over one transport, namespace and set of sessions.

    Args:
        transport: Sends requests.
        keyspace: Maps election names to etcd keys.
        sessions: Provides the session lease for each TTL.
    """

    def __init__(self, transport: Transport, keyspace: Keyspace, sessions: Sessions) -> None:
        self._transport = transport
        self._keyspace = keyspace
        self._sessions = sessions
        self._contenders = Contenders(
            transport, keyspace, sessions, noun="election", misuse=NotAnElectionError
        )

    def campaign(
        self, name: object, value: object, *, ttl: object = None, timeout: object = None
    ) -> Leadership:
        """Wait until elected; see `EtcdPatterns.elected`."""
        raw = self._name(name)
        proposal = encode_value(value)
        lease_ttl = None if ttl is None else check_ttl(ttl)
        deadline = Deadline(check_timeout(timeout))
        won = self._contenders.contend(
            raw,
            proposal,
            lease_ttl=lease_ttl,
            deadline=deadline,
            timeout_error=lambda: ElectionTimeoutError(
                f"not elected leader of {self._keyspace.decode(raw)!r} in time"
            ),
        )
        return self._lead(raw, won, proposal)

    def resign(self, leadership: Leadership) -> bool:
        """Delete the leader's key, if it is still this leader's.

        Returns:
            False if the key was already gone: the leadership had been lost.
        """
        return self._contenders.leave(
            leadership.etcd_key, leadership.fencing_token, leadership._session
        )

    def proclaim(self, leadership: Leadership, value: object) -> None:
        """See `Leadership.proclaim`."""
        proposal = encode_value(value)
        deadline = Deadline(self._transport.timeout)
        while True:
            # The leader's key must be unchanged since this process last
            # knew it, so that a copy of an earlier proclamation, which
            # compares an older mod revision, can never apply after this one.
            committed = commit(
                self._transport,
                self._sessions.get,
                compare=[
                    leadership._holds(),
                    ops.compare_mod(leadership.etcd_key, "==", leadership._mod_revision),
                ],
                success=[ops.put(leadership.etcd_key, proposal, lease=leadership.lease_id)],
                failure=[ops.get(leadership.etcd_key, keys_only=True)],
            )
            if committed.succeeded:
                leadership._mod_revision = committed.revision
                leadership.value = proposal.decode()
                return
            assert committed.responses is not None  # failures always carry responses
            (mine,) = ops.kvs(committed.responses, 0) or [None]
            if mine is None or mine.create_revision != leadership.fencing_token:
                raise leadership._lost_error("the value was not proclaimed")
            # Still leading, but the key changed: an earlier proclamation
            # whose outcome was unknown applied after all, or another client
            # wrote to the key. Any copy still in flight compares an older
            # mod revision, which can never hold again: proclaim over this.
            leadership._mod_revision = mine.mod_revision
            if deadline.expired():
                raise ConflictError(
                    f"the leader's key of election {leadership.name!r} kept changing; "
                    "the value was not proclaimed"
                )

    def leader(self, name: object) -> LeaderInfo | None:
        """See `EtcdPatterns.leader`."""
        return self._info(self._contenders.winner(self._name(name)).kv)

    def observe(
        self, name: object, *, timeout: object = None
    ) -> Generator[LeaderInfo | None, None, None]:
        """See `EtcdPatterns.observe`."""
        raw = self._name(name)
        wait_for = check_timeout(timeout)
        return self._observe(raw, wait_for)

    def _observe(
        self, raw: bytes, timeout: float | None
    ) -> Generator[LeaderInfo | None, None, None]:
        start, end = children_range(raw)

        def watch(state: Winner) -> Watch:
            if state.kv is None:
                # Nobody leads: the first candidate to arrive will.
                create = etcdrpc.WatchCreateRequest(
                    key=start, range_end=end, filters=[etcdrpc.WatchCreateRequest.NODELETE]
                )
            else:
                # Only the leader's key: its value may change, or it may go.
                create = etcdrpc.WatchCreateRequest(key=state.kv.key)
            return Watch([create], lambda event: True)

        return changes(
            self._transport,
            lambda: self._contenders.winner(raw),
            view=lambda state: self._info(state.kv),
            watch=watch,
            timeout=timeout,
            timeout_error=lambda: ElectionTimeoutError(
                f"no change of leader of {self._keyspace.decode(raw)!r} in time"
            ),
        )

    def _lead(self, raw: bytes, won: Won, proposal: bytes) -> Leadership:
        return Leadership(
            elections=self,
            name=self._keyspace.decode(raw),
            key=self._keyspace.decode(won.key),
            value=proposal.decode(),
            etcd_key=won.key,
            fencing_token=won.revision,
            session=won.session,
            transport=self._transport,
        )

    def _name(self, name: object) -> bytes:
        return self._keyspace.encode(name, name="election name", trailing_slash=True)

    def _info(self, kv: Any | None) -> LeaderInfo | None:
        if kv is None:
            return None
        return LeaderInfo(
            key=self._keyspace.decode(kv.key),
            value=kv.value.decode("utf-8", "backslashreplace"),
            fencing_token=kv.create_revision,
        )


class Elected(Holding[Leadership]):
    """Context manager of `EtcdPatterns.elected`: leads, or raises; resigns on exit."""

    def __init__(
        self, elections: Elections, name: object, value: object, ttl: object, timeout: object
    ) -> None:
        super().__init__(
            lambda: elections.campaign(name, value, ttl=ttl, timeout=timeout),
            elections.resign,
            lost="it was lost while leading",
        )
