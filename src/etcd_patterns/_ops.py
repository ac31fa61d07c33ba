"""Builders for the etcdrpc messages that make up a transaction.

The etcd3 client's own transaction helpers cannot sort or limit a range, nor
compare over a range of keys; these build the protobuf messages directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from etcd3 import etcdrpc

_Compare = etcdrpc.Compare
_RESULTS = {
    "==": _Compare.EQUAL,
    "!=": _Compare.NOT_EQUAL,
    "<": _Compare.LESS,
    ">": _Compare.GREATER,
}


def compare_version(key: bytes, op: str, version: int, *, range_end: bytes = b"") -> Any:
    """``version(key) <op> version``; over ``[key, range_end)`` every key must match."""
    return _Compare(
        key=key, range_end=range_end, target=_Compare.VERSION, result=_RESULTS[op], version=version
    )


def compare_create(key: bytes, op: str, revision: int, *, range_end: bytes = b"") -> Any:
    """``create_revision(key) <op> revision``."""
    return _Compare(
        key=key,
        range_end=range_end,
        target=_Compare.CREATE,
        result=_RESULTS[op],
        create_revision=revision,
    )


def compare_mod(key: bytes, op: str, revision: int) -> Any:
    """``mod_revision(key) <op> revision``."""
    return _Compare(key=key, target=_Compare.MOD, result=_RESULTS[op], mod_revision=revision)


def compare_value(key: bytes, op: str, value: bytes, *, range_end: bytes = b"") -> Any:
    """``value(key) <op> value``; false when the key does not exist.

    Over ``[key, range_end)`` every key must match, and an empty range is false.
    """
    return _Compare(
        key=key, range_end=range_end, target=_Compare.VALUE, result=_RESULTS[op], value=value
    )


def compare_lease(key: bytes, op: str, lease: int) -> Any:
    """``lease(key) <op> lease``; a missing key compares as lease 0."""
    return _Compare(key=key, target=_Compare.LEASE, result=_RESULTS[op], lease=lease)


def range_request(
    key: bytes,
    range_end: bytes = b"",
    *,
    limit: int = 0,
    keys_only: bool = False,
    oldest_first: bool = False,
    newest_first: bool = False,
    max_create_revision: int = 0,
    revision: int = 0,
) -> Any:
    """A `RangeRequest`: one key, or ``[key, range_end)``.

    Args:
        key: The key, or the start of the range.
        range_end: The end of the range (exclusive); empty for one key.
        limit: At most this many keys; 0 for all.
        keys_only: Leave the values out.
        oldest_first: Sort by create revision, ascending.
        newest_first: Sort by create revision, descending.
        max_create_revision: Only keys created at or before this revision.
        revision: Read the keyspace as it was at this revision; 0 for now.
    """
    request = etcdrpc.RangeRequest(
        key=key,
        range_end=range_end,
        limit=limit,
        keys_only=keys_only,
        max_create_revision=max_create_revision,
        revision=revision,
    )
    if oldest_first or newest_first:
        request.sort_target = etcdrpc.RangeRequest.CREATE
        request.sort_order = (
            etcdrpc.RangeRequest.ASCEND if oldest_first else etcdrpc.RangeRequest.DESCEND
        )
    return request


def get(key: bytes, range_end: bytes = b"", **options: Any) -> Any:
    """A range operation inside a transaction; ``options`` as for `range_request`."""
    return etcdrpc.RequestOp(request_range=range_request(key, range_end, **options))


def put(key: bytes, value: bytes, *, lease: int = 0) -> Any:
    """A put operation inside a transaction."""
    return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=value, lease=lease))


def delete(key: bytes, range_end: bytes = b"") -> Any:
    """A delete operation inside a transaction."""
    return etcdrpc.RequestOp(
        request_delete_range=etcdrpc.DeleteRangeRequest(key=key, range_end=range_end)
    )


def txn(compare: list[Any], success: list[Any], failure: list[Any]) -> Any:
    """A `TxnRequest`."""
    return etcdrpc.TxnRequest(compare=compare, success=success, failure=failure)


def nested(compare: list[Any], success: list[Any], failure: list[Any]) -> Any:
    """A transaction inside a transaction's branch (etcd 3.3 and later)."""
    return etcdrpc.RequestOp(request_txn=txn(compare, success, failure))


def delete_if_created(key: bytes, revision: int | None) -> Any:
    """A `TxnRequest` deleting ``key`` only if it is the incarnation created at ``revision``.

    With ``revision`` None, the key is deleted whatever its incarnation.
    Sending it twice is harmless: the second copy finds nothing to delete.
    """
    compare = [] if revision is None else [compare_create(key, "==", revision)]
    return txn(compare=compare, success=[delete(key)], failure=[])


def kvs(responses: Sequence[Any], index: int) -> list[Any]:
    """The key-values returned by the range at ``index`` of a transaction's responses."""
    found: list[Any] = list(responses[index].response_range.kvs)
    return found
