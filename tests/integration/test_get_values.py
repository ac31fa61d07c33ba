"""get_values against a real etcd."""

from __future__ import annotations

import pytest

from etcd_patterns import EtcdPatterns, ValueDecodeError
from etcd_patterns.testing import EtcdCluster, ExternalEtcd
from tests.helpers import Raw


def test_a_value(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("k", "v")
    assert patterns.get_values("k") == ["v"]
    assert patterns.get_values(b"k") == ["v"]


def test_an_empty_value_is_a_value(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("k", "")
    assert patterns.get_values("k") == [""]


def test_a_missing_key(patterns: EtcdPatterns) -> None:
    assert patterns.get_values("nothing") == []


def test_a_directory_lists_direct_children_in_key_order(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("d/b", "2")
    raw.put("d/a", "1")
    raw.put("d/c", "3")
    raw.put("d/a/deeper", "grandchild")
    raw.put("d2", "sibling")
    raw.put("d-x", "sibling")
    raw.put("d/", "empty child name")
    assert patterns.get_values("d") == ["empty child name", "1", "2", "3"]


def test_a_key_with_a_value_and_children_is_a_value(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("k", "own")
    raw.put("k/child", "c")
    assert patterns.get_values("k") == ["own"]


def test_only_grandchildren_means_empty(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("d/a/b", "x")
    assert patterns.get_values("d") == []


def test_unicode_round_trip(patterns: EtcdPatterns, raw: Raw) -> None:
    raw.put("ключ", "значение ✓")
    assert patterns.get_values("ключ") == ["значение ✓"]


def test_namespace_isolates_keys(
    etcd: EtcdCluster | ExternalEtcd, namespace: str, raw: Raw
) -> None:
    raw.put("a/k", "in a")
    raw.put("b/k", "in b")
    with (
        EtcdPatterns.connect(etcd.endpoints, namespace=namespace + "a/") as a,
        EtcdPatterns.connect(etcd.endpoints, namespace=namespace + "b/") as b,
    ):
        assert a.namespace == namespace + "a/"
        assert a.get_values("k") == ["in a"]
        assert b.get_values("k") == ["in b"]
        assert a.get_values("b") == []


def test_non_utf8_data_raises_instead_of_returning_garbage(
    patterns: EtcdPatterns, raw: Raw
) -> None:
    raw.put("bin", b"\xff\xfe")
    with pytest.raises(ValueDecodeError, match="bin"):
        patterns.get_values("bin")
    raw.put("d/x", b"\x80")
    with pytest.raises(ValueDecodeError, match="d/x"):
        patterns.get_values("d")


def test_one_round_trip_from_one_snapshot(
    etcd: EtcdCluster | ExternalEtcd, patterns: EtcdPatterns, raw: Raw
) -> None:
    for i in range(100):
        raw.put(f"d/{i:03}", str(i))
    with etcd.count_rpcs() as rpcs:
        values = patterns.get_values("d")
    assert values == [str(i) for i in range(100)]
    assert rpcs.kv == 1
