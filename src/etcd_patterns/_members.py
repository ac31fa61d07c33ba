"""Group membership: who is alive, and what each member says of itself.

Layout: member ``member_id`` of group ``group`` is the key
``group/member_id``, on its session lease, holding the member's value, so
``etcdctl get --prefix group/`` lists the members, and a key that another
client puts there on a lease of its own is a member too. A key there without
a lease is data, not a member: nothing would ever make it leave, so it is
not listed, and a partitioner gives it no items.

Protocol:

* Joining creates the key only if it does not exist, through the
  exactly-once commit, on the session lease of the requested TTL.
* `Member.update` rewrites the value, guarded by the key's create
  revision, through the commit too.
* Leaving deletes the key if it is still this member's (its create
  revision); a member that cannot reach etcd leaves it to its session.
* `members` reads the group's direct children on a lease in one round trip;
  `watch_members` follows them with the shared wait loop (`_wait.changes`).

Guarantees:

* A member is in the group from its join until it leaves, or until its
  lease expires: a process that dies leaves within its TTL.
* One id, one member: joining with an id that the group has raises
  `MemberExistsError` and writes nothing.
* A `Member` is a `Fence`: its fencing token is the key's create revision,
  and ``guard=member`` writes only while it is still in the group.
* `watch_members` yields the membership now, then after each change,
  never missing the latest one, as `watch_values` does.

Cost: joining is one round trip (plus a lease grant for a TTL not used
before); updating, leaving and `members` one each; `watch_members` one read
and one watch stream, then one read per change.

Lease loss: etcd deletes the key with the lease; `Member.lost` is set, an
update raises `MembershipLostError` and writes nothing, and so does leaving
the block.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import NamedTuple, TypeVar

from . import _ops as ops
from ._commit import commit
from ._errors import (
    MemberExistsError,
    MembershipLostError,
    OutcomeUnknownError,
    WatchTimeoutError,
)
from ._fence import Fence, Holding, give_back
from ._keys import Keyspace, children_range, decode_value, encode_segment, encode_value
from ._retry import check_timeout
from ._session import Orphan, Session, Sessions, check_ttl
from ._transport import Transport
from ._wait import changes, children_watch

V = TypeVar("V")


class Roster(NamedTuple):
    """A group's members, the create revisions of their keys, and the revision read at."""

    members: dict[str, str]
    created: dict[str, int]
    revision: int


class Member(Fence):
    """This process's membership of a group, inside ``with etcd.member(...) as me:``. A `Fence`.

    Attributes:
        group: The group's name, without the namespace.
        member_id: This member's id in the group.
        key: The member's key, without the namespace.
        value: The value it advertises.
        fencing_token: The key's create revision.
        lease_id: The session lease that the key carries.
    """

    def __init__(
        self,
        *,
        groups: Groups,
        group: str,
        member_id: str,
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
        self.group = group
        self.member_id = member_id
        self.key = key
        self.value = value
        self._groups = groups

    def __repr__(self) -> str:
        return f"<Member {self.member_id!r} of {self.group!r} fencing_token={self.fencing_token}>"

    def update(self, value: str | bytes) -> None:
        """Advertise another value: one round trip, exactly once.

        Raises:
            MembershipLostError: This member is gone from the group; nothing
                was written.
            InvalidArgumentError, InvalidTypeError: Bad input; nothing was
                written.
        """
        self._groups.update(self, value)

    def _lost_error(self, consequence: str) -> MembershipLostError:
        return MembershipLostError(
            f"member {self.member_id!r} is gone from group {self.group!r}; {consequence}"
        )


class Groups:
    """Group membership over one transport, namespace and set of sessions.

    Args:
        transport: Sends requests.
        keyspace: Maps group names to etcd keys.
        sessions: Provides the session lease for each TTL.
    """

    def __init__(self, transport: Transport, keyspace: Keyspace, sessions: Sessions) -> None:
        self._transport = transport
        self._keyspace = keyspace
        self._sessions = sessions

    def join(
        self, group: object, member_id: object, value: object = "", *, ttl: object = None
    ) -> Member:
        """See `EtcdPatterns.member`."""
        raw = self._keyspace.encode(group, name="group")
        segment = encode_segment(member_id, name="member_id")
        advertised = encode_value(value)
        lease_ttl = None if ttl is None else check_ttl(ttl)
        key = raw + b"/" + segment
        if self._sessions.abandoned(lease_ttl, key):
            # The session deletes that key by name: a join now could be the
            # one it deletes.
            raise MemberExistsError(
                f"an earlier join of {segment.decode()!r} to group "
                f"{self._keyspace.decode(raw)!r} by this process is still in doubt; its key, "
                "if it was made, is deleted once etcd answers, within a third of the TTL"
            )
        try:
            committed = commit(
                self._transport,
                lambda: self._sessions.get(lease_ttl),
                compare=[ops.compare_version(key, "==", 0)],
                success=lambda session: [ops.put(key, advertised, lease=session.lease_id)],
                failure=[ops.get(key, keys_only=True)],
            )
        except BaseException as exc:
            # A join in doubt must not leave a member behind that nobody
            # holds: the key goes, if it carries this process's lease.
            if isinstance(exc, OutcomeUnknownError):
                self._sessions.abandon(lease_ttl, Orphan(key))
            elif not isinstance(exc, Exception):
                self._sessions.withdraw(lease_ttl, Orphan(key))
            raise
        if not committed.succeeded:
            assert committed.responses is not None  # failures always carry responses
            (found,) = ops.kvs(committed.responses, 0) or [None]
            if found is not None and not found.lease:
                raise MemberExistsError(
                    f"key {self._keyspace.decode(key)!r} holds data (it carries no lease), "
                    f"so id {segment.decode()!r} cannot join group "
                    f"{self._keyspace.decode(raw)!r}; store data outside the group"
                )
            raise MemberExistsError(
                f"group {self._keyspace.decode(raw)!r} has a member {segment.decode()!r} already"
            )
        return Member(
            groups=self,
            group=self._keyspace.decode(raw),
            member_id=segment.decode(),
            key=self._keyspace.decode(key),
            value=advertised.decode(),
            etcd_key=key,
            fencing_token=committed.revision,
            session=committed.session,
            transport=self._transport,
        )

    def leave(self, member: Member) -> bool:
        """Delete the member's key if it is still this member's.

        Returns:
            False if it was gone already, with its lease. True otherwise,
            including when etcd could not be reached: the session then
            deletes the key as soon as etcd answers again.
        """
        return give_back(self._transport, member.etcd_key, member.fencing_token, member._session)

    def update(self, member: Member, value: object) -> None:
        """See `Member.update`."""
        advertised = encode_value(value)
        committed = commit(
            self._transport,
            self._sessions.get,
            compare=[member._holds()],
            success=[ops.put(member.etcd_key, advertised, lease=member.lease_id)],
            failure=[],
        )
        if not committed.succeeded:
            raise member._lost_error("the value was not updated")
        member.value = advertised.decode()

    def members(self, group: object) -> dict[str, str]:
        """See `EtcdPatterns.members`."""
        return self.roster(self._keyspace.encode(group, name="group")).members

    def watch_members(
        self, group: object, *, timeout: object = None
    ) -> Generator[dict[str, str], None, None]:
        """See `EtcdPatterns.watch_members`."""
        raw = self._keyspace.encode(group, name="group")
        return self.follow(raw, view=lambda roster: roster.members, timeout=check_timeout(timeout))

    def roster(self, raw: bytes) -> Roster:
        """A group's members, with their keys' create revisions: one round trip."""
        start, end = children_range(raw)
        response = self._transport.range(ops.range_request(start, end))
        # Direct children on a lease: a key without one is data.
        found = [kv for kv in response.kvs if kv.lease and b"/" not in kv.key[len(start) :]]
        ids = [kv.key[len(start) :].decode("utf-8", "replace") for kv in found]
        return Roster(
            {
                member_id: decode_value(kv.value, key=self._keyspace.decode(kv.key))
                for member_id, kv in zip(ids, found, strict=True)
            },
            {member_id: kv.create_revision for member_id, kv in zip(ids, found, strict=True)},
            response.header.revision,
        )

    def follow(
        self, raw: bytes, *, view: Callable[[Roster], V], timeout: float | None
    ) -> Generator[V, None, None]:
        """What ``view`` shows of the group now, then each time it shows something else."""
        return changes(
            self._transport,
            lambda: self.roster(raw),
            view=view,
            watch=lambda _roster: children_watch(raw, itself=False),
            timeout=timeout,
            timeout_error=lambda: WatchTimeoutError(
                f"the members of group {self._keyspace.decode(raw)!r} did not change in time"
            ),
        )


class Joined(Holding[Member]):
    """Context manager of `EtcdPatterns.member`: joins on entry, leaves on exit."""

    def __init__(
        self, groups: Groups, group: object, member_id: object, value: object, ttl: object
    ) -> None:
        super().__init__(
            lambda: groups.join(group, member_id, value, ttl=ttl),
            groups.leave,
            lost="it was lost while a member",
        )
