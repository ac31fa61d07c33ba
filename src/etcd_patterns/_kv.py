"""Key-value patterns: get_values, try_transform, transform.

Guarantees:

* `get_values` reads one consistent snapshot (one revision) in one round trip.
* `try_transform` writes ``fn(value)`` only if the key is unchanged since it
  was read (its mod revision), preserving the key's lease; otherwise it
  writes nothing and returns the current value from the same transaction.
* `transform` repeats that until it wins. Each loss costs one round trip,
  because the losing transaction already carries the fresh value.
* Each successful transform is applied exactly once, even if etcd's answer
  is lost on the way back (see `_commit`). ``fn`` may be called several
  times, so it must be a pure function of its argument.
* Bad input, a ``fn`` that raises, or a ``fn`` that returns a non-`str`
  write nothing.
* With ``guard=fence`` (a held lock or a claimed item), the write also
  requires the holder's key to still exist with its fencing token; if it
  does not, the holder's lost error (`LockLostError`, `ClaimLostError`) is
  raised and nothing is written. See `_fence`.

Lease loss: transforms record their outcome on the instance's session lease.
A lost lease is replaced transparently; only if it is lost while the outcome
of a write is unknown does `OutcomeUnknownError` reach the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import _ops as ops
from ._commit import commit
from ._errors import (
    ConflictError,
    InvalidTypeError,
    KeyNotFoundError,
    NotAValueError,
    QuotaExceededError,
)
from ._fence import Fence
from ._keys import Keyspace, children_range, decode_value, encode_value, is_direct_child
from ._retry import Deadline, check_timeout, retry_conflicts
from ._session import Session
from ._transport import Transport

Transform = Callable[[str], str]


class Values(NamedTuple):
    """What `get_values` read, and the revision it read at."""

    values: list[str]
    revision: int


class TryTransformResult(NamedTuple):
    """The outcome of `EtcdPatterns.try_transform`.

    Attributes:
        succeeded: Whether ``fn``'s result was written.
        value: The value written; or, if another writer got in first, the
            current value (``default`` if the key is now gone).
    """

    succeeded: bool
    value: str


@dataclass(frozen=True)
class _Current:
    """What a transform knows of the key before writing."""

    value: str | None  # None: the key holds no value
    mod_revision: int
    lease: int


class KeyValue:
    """The key-value patterns over one transport and namespace.

    Args:
        transport: Sends requests.
        keyspace: Maps user keys to etcd keys.
        session: Returns the live session that records write outcomes.
    """

    def __init__(
        self, transport: Transport, keyspace: Keyspace, session: Callable[[], Session]
    ) -> None:
        self._transport = transport
        self._keyspace = keyspace
        self._session = session

    def get_values(self, key: object) -> list[str]:
        """Read a key's value, or the values of its direct children.

        See `EtcdPatterns.get_values`.
        """
        return self.read_values(self._keyspace.encode(key)).values

    def read_values(self, raw: bytes) -> Values:
        """`get_values` of a validated key, and the revision it read at."""
        start, end = children_range(raw)
        # One snapshot: the key's own value if it has one, else its children.
        try:
            response = self._transport.txn(
                ops.txn(
                    compare=[ops.compare_version(raw, ">", 0)],
                    success=[ops.get(raw)],
                    failure=[ops.get(start, end)],
                ),
                write=False,
            )
            has_value, found = bool(response.succeeded), ops.kvs(response.responses, 0)
            revision: int = response.header.revision
        except QuotaExceededError:
            has_value, found, revision = self._read_without_txn(raw)
        return Values(
            [
                decode_value(kv.value, key=self._keyspace.decode(kv.key))
                for kv in found
                if has_value or is_direct_child(raw, kv.key)
            ],
            revision,
        )

    def try_transform(
        self, key: object, fn: object, *, default: object = None, guard: object = None
    ) -> TryTransformResult:
        """Apply ``fn`` to the value once, unless another writer gets in first.

        See `EtcdPatterns.try_transform`.
        """
        raw, transform, initial, held = self._check(key, fn, default, guard)
        current = self._read(raw)
        written, current = self._attempt(raw, transform, initial, current, held)
        if written is not None:
            return TryTransformResult(True, written)
        if current.value is not None:
            return TryTransformResult(False, current.value)
        if initial is None:
            raise KeyNotFoundError(self._keyspace.decode(raw))
        return TryTransformResult(False, initial)

    def transform(
        self,
        key: object,
        fn: object,
        *,
        default: object = None,
        timeout: object = None,
        guard: object = None,
    ) -> str:
        """Apply ``fn`` to the value, retrying until no other writer interferes.

        See `EtcdPatterns.transform`.
        """
        raw, transform, initial, held = self._check(key, fn, default, guard)
        wait = check_timeout(timeout)
        current = self._read(raw)

        def attempt() -> str | None:
            nonlocal current
            written, current = self._attempt(raw, transform, initial, current, held)
            return written

        def give_up(attempts: int) -> ConflictError:
            return ConflictError(
                f"transform of {self._keyspace.decode(raw)!r} lost to other writers "
                f"{attempts} times in {wait}s"
            )

        return retry_conflicts(attempt, Deadline(wait), give_up=give_up)

    def _read_without_txn(self, raw: bytes) -> tuple[bool, list[Any], int]:
        """The key, else its children, with plain ranges at one revision.

        etcd refuses even read-only transactions while its NOSPACE alarm is
        raised, but still serves ranges: this costs two round trips instead
        of one, and reads the same snapshot.
        """
        own = self._transport.range(ops.range_request(raw))
        revision: int = own.header.revision
        if own.kvs:
            return True, list(own.kvs), revision
        start, end = children_range(raw)
        request = ops.range_request(start, end, revision=revision)
        return False, list(self._transport.range(request).kvs), revision

    # -- steps --------------------------------------------------------------

    def _check(
        self, key: object, fn: object, default: object, guard: object
    ) -> tuple[bytes, Transform, str | None, Fence | None]:
        raw = self._keyspace.encode(key)
        if not callable(fn):
            raise InvalidTypeError(f"fn must be callable, not {type(fn).__name__}")
        if guard is not None and not isinstance(guard, Fence):
            raise InvalidTypeError(
                f"guard must be a fence (a held lock or a claimed item), not {type(guard).__name__}"
            )
        initial = None if default is None else encode_value(default, name="default").decode("utf-8")
        transform: Transform = fn
        return raw, transform, initial, guard

    def _read(self, raw: bytes) -> _Current:
        start, end = children_range(raw)
        response = self._transport.txn(
            ops.txn(
                compare=[ops.compare_version(raw, ">", 0)],
                success=[ops.get(raw)],
                failure=[ops.get(start, end, limit=1, keys_only=True)],
            ),
            write=False,
        )
        return self._current(raw, response.succeeded, ops.kvs(response.responses, 0))

    def _current(self, raw: bytes, has_value: bool, found: list[Any]) -> _Current:
        if has_value and found:
            kv = found[0]
            return _Current(
                decode_value(kv.value, key=self._keyspace.decode(raw)), kv.mod_revision, kv.lease
            )
        if found:
            raise NotAValueError(self._keyspace.decode(raw))
        return _Current(None, 0, 0)

    def _attempt(
        self,
        raw: bytes,
        fn: Transform,
        initial: str | None,
        current: _Current,
        guard: Fence | None,
    ) -> tuple[str | None, _Current]:
        """Compute and write once; the value written (or None) and what is now known."""
        if current.value is None:
            if initial is None:
                raise KeyNotFoundError(self._keyspace.decode(raw))
            base = initial
        else:
            base = current.value
        result = fn(base)
        if not isinstance(result, str):
            raise InvalidTypeError(f"fn must return str, not {type(result).__name__}")
        new = encode_value(result, name="fn's result")
        start, end = children_range(raw)
        if current.value is None:
            # Create the key, and only while it is neither a value nor a directory.
            compare = [
                ops.compare_version(raw, "==", 0),
                ops.compare_version(start, "==", 0, range_end=end),
            ]
        else:
            compare = [ops.compare_mod(raw, "==", current.mod_revision)]
        failure = [ops.get(raw), ops.get(start, end, limit=1, keys_only=True)]
        if guard is not None:
            compare.append(guard._holds())
            failure.append(ops.get(guard.etcd_key, keys_only=True))
        committed = commit(
            self._transport,
            self._session,
            compare=compare,
            success=[ops.put(raw, new, lease=current.lease)],
            failure=failure,
        )
        if committed.succeeded:
            return result, current
        assert committed.responses is not None  # failures always carry responses
        if guard is not None and not any(
            kv.create_revision == guard.fencing_token for kv in ops.kvs(committed.responses, 2)
        ):
            raise guard._lost_error(f"{self._keyspace.decode(raw)!r} was not written")
        own, children = ops.kvs(committed.responses, 0), ops.kvs(committed.responses, 1)
        return None, self._current(raw, bool(own), own or children)
