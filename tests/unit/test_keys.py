from __future__ import annotations

import pytest

from etcd_patterns import InvalidArgumentError, InvalidTypeError, ValueDecodeError
from etcd_patterns._keys import (
    Keyspace,
    children_range,
    decode_value,
    encode_value,
    is_direct_child,
    prefix_end,
)


@pytest.mark.parametrize(
    ("prefix", "end"),
    [
        (b"a", b"b"),
        (b"a/", b"a0"),
        (b"a\xff", b"b"),
        (b"\xff\xff", b"\0"),
        (b"", b"\0"),
    ],
)
def test_prefix_end(prefix: bytes, end: bytes) -> None:
    assert prefix_end(prefix) == end


def test_children_range_excludes_siblings() -> None:
    start, end = children_range(b"/app/dir")
    assert start == b"/app/dir/"
    assert start <= b"/app/dir/x" < end
    for sibling in (b"/app/dir2", b"/app/dir-x", b"/app/dir", b"/app/dir0"):
        assert not (start <= sibling < end)


def test_is_direct_child() -> None:
    assert is_direct_child(b"d", b"d/a")
    assert not is_direct_child(b"d", b"d/a/b")


def test_namespace_is_a_raw_prefix() -> None:
    assert Keyspace("/app/").encode("jobs") == b"/app/jobs"
    assert Keyspace("/app").encode("/jobs") == b"/app/jobs"
    assert Keyspace(None).encode("jobs") == b"jobs"
    assert Keyspace("/app/").decode(b"/app/jobs/1") == "jobs/1"


def test_bytes_keys_are_accepted() -> None:
    assert Keyspace("/n/").encode(b"k") == b"/n/k"


@pytest.mark.parametrize(
    ("key", "error"),
    [
        (None, InvalidTypeError),
        (1, InvalidTypeError),
        (bytearray(b"k"), InvalidTypeError),
        ("", InvalidArgumentError),
        (b"", InvalidArgumentError),
        ("dir/", InvalidArgumentError),
        (b"\xff\xfe", InvalidArgumentError),
        ("\udc80", InvalidArgumentError),
        (".etcd-patterns/slots/1", InvalidArgumentError),
    ],
)
def test_bad_keys(key: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        Keyspace("/n/").encode(key)


def test_misuse_errors_are_builtin_errors_too() -> None:
    with pytest.raises(TypeError):
        Keyspace().encode(None)
    with pytest.raises(ValueError, match="empty"):
        Keyspace().encode("")


def test_values_round_trip() -> None:
    assert encode_value("zoë") == "zoë".encode()
    assert encode_value(b"raw") == b"raw"
    assert decode_value("zoë".encode(), key="k") == "zoë"


def test_undecodable_value_names_its_key() -> None:
    with pytest.raises(ValueDecodeError, match="'k'"):
        decode_value(b"\xff", key="k")
