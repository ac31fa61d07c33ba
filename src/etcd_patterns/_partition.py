"""A work partitioner: the group's live members split the items among them.

Protocol: each partitioner joins the group as a member (`_members`). The
owner of an item, among the members of one membership read, is the member
with the highest weight for it: the first 8 bytes of the BLAKE2b hash of
the member's id and the item (rendezvous, or highest-random-weight,
hashing). Every member computes its share from its own read;
`Partition.changes` follows the membership with the shared wait loop.

Guarantees:

* From any one membership read (one revision), every item has exactly one
  owner among the members of that read: the shares computed from it are
  disjoint and cover every item, whoever computes them.
* Movement is minimal: when a member joins, only the items it now wins
  move to it, about 1/n of them; when one leaves, only its items move,
  spread over the others.
* After a member dies, its items are re-owned within its TTL plus etcd's
  expiry sweep: that is when the others' `changes` yield their new shares.

Handover race: members read the membership at different moments, so for a
while an old owner may still work on an item that its new owner starts.
Membership alone cannot prevent that. `Partition.lock` takes the library's
lock for one item (``<group>.partitions/<item>``), so that a handover waits
until the old owner lets go, and its fencing token guards the work's
writes.

Cost: joining is one round trip; `Partition.owned` one; `Partition.changes`
one read and one watch stream, then one read per change of membership.

Lease loss: as a member's (see `_members`): the member's key goes with its
lease, and `Partition.owned` then raises `MembershipLostError`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator, Sequence
from types import TracebackType

from ._errors import InvalidArgumentError, InvalidTypeError
from ._keys import encode_segment
from ._lock import Locked
from ._members import Groups, Joined, Member, Roster
from ._retry import check_timeout


def weight(member_id: str, item: str) -> int:
    """A member's weight for an item: the same in every process."""
    digest = hashlib.blake2b(member_id.encode() + b"\0" + item.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(members: Sequence[str], item: str) -> str:
    """The member that owns ``item``: the highest weight, ties broken by id."""
    return max(members, key=lambda member_id: (weight(member_id, item), member_id))


def shares(members: Sequence[str], items: Sequence[str]) -> dict[str, list[str]]:
    """Every member's items, in the order of ``items``."""
    owned: dict[str, list[str]] = {member_id: [] for member_id in members}
    for item in items:
        owned[owner(members, item)].append(item)
    return owned


def check_items(items: object) -> list[str]:
    """Validate a partitioner's items: distinct str, each one segment of a key (no ``/``)."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise InvalidTypeError(f"items must be a list of str, not {type(items).__name__}")
    checked: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidTypeError(f"items must be str, not {type(item).__name__}")
        encode_segment(item, name="item")  # it names a lock
        checked.append(item)
    if len(set(checked)) != len(checked):
        raise InvalidArgumentError("items must be distinct")
    return checked


class Partition:
    """This member's share of the items, inside ``with etcd.partitioner(...) as part:``.

    Attributes:
        member: This process's `Member` of the group: a `Fence`.
        items: Every item, in order.
    """

    def __init__(
        self,
        *,
        groups: Groups,
        member: Member,
        items: list[str],
        locked: Callable[[str, float | None], Locked],
    ) -> None:
        self.member = member
        self.items = items
        self._groups = groups
        self._locked = locked

    def __repr__(self) -> str:
        return f"<Partition of {self.member.group!r} for {self.member.member_id!r}>"

    def owned(self) -> list[str]:
        """The items this member owns now, in order: one round trip.

        Raises:
            MembershipLostError: This member is gone from the group.
        """
        return self._share(self._groups.roster(self._raw))

    def changes(self, *, timeout: float | None = None) -> Generator[list[str], None, None]:
        """The owned items now, then each time they change, as the membership changes.

        Args:
            timeout: How long to wait for each next change of the share;
                None waits forever.

        Raises:
            WatchTimeoutError: No change of the share within ``timeout`` (a
                `TimeoutError`), raised by the iterator, which then ends.
            MembershipLostError: This member is gone from the group.
        """
        return self._groups.follow(self._raw, view=self._share, timeout=check_timeout(timeout))

    def lock(self, item: str, *, timeout: float | None = None) -> Locked:
        """A lock for one item, to make a handover safe: ``with part.lock(item) as held:``.

        The lock is ``<group>.partitions/<item>``, the library's lock, so it
        waits until a previous owner that still works on the item lets go,
        and ``held`` is a `Fence` for the work's writes.
        """
        if item not in self.items:
            raise InvalidArgumentError(f"{item!r} is not one of the partitioned items")
        return self._locked(f"{self.member.group}.partitions/{item}", timeout)

    @property
    def _raw(self) -> bytes:
        return self.member.etcd_key.rpartition(b"/")[0]

    def _share(self, roster: Roster) -> list[str]:
        # This member, by its key's incarnation: a process that took its id
        # over after its lease expired is not this member.
        mine = roster.created.get(self.member.member_id)
        if mine != self.member.fencing_token or self.member.lost.is_set():
            raise self.member._lost_error("it owns nothing")
        return shares(sorted(roster.members), self.items)[self.member.member_id]


class Partitioned:
    """Context manager of `EtcdPatterns.partitioner`: joins on entry, leaves on exit.

    Leaving raises `MembershipLostError` if the membership was lost in the
    block, unless the block is already raising.
    """

    def __init__(
        self,
        groups: Groups,
        group: object,
        member_id: object,
        items: object,
        *,
        ttl: object,
        locked: Callable[[str, float | None], Locked],
    ) -> None:
        self._items = check_items(items)
        self._joined = Joined(groups, group, member_id, "", ttl)
        self._groups = groups
        self._locked = locked

    def __enter__(self) -> Partition:
        member = self._joined.__enter__()
        return Partition(groups=self._groups, member=member, items=self._items, locked=self._locked)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._joined.__exit__(exc_type, exc, traceback)
