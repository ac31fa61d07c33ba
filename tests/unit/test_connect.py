from __future__ import annotations

import pytest

from etcd_patterns import InvalidArgumentError, InvalidTypeError
from etcd_patterns._connect import Endpoint, parse_endpoints


def test_comma_separated_string() -> None:
    assert parse_endpoints("h1:1,h2:2, h3:3") == [
        Endpoint("h1", 1, tls=False),
        Endpoint("h2", 2, tls=False),
        Endpoint("h3", 3, tls=False),
    ]


def test_list_schemes_default_port_and_ipv6() -> None:
    parsed = parse_endpoints(["http://a:1", "https://b", "[::1]:5"])
    assert parsed == [Endpoint("a", 1, False), Endpoint("b", 2379, True), Endpoint("::1", 5, False)]
    assert parsed[2].netloc == "[::1]:5"


def test_environment_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETCD_ENDPOINTS", "e1:7,e2:8")
    assert [e.netloc for e in parse_endpoints(None)] == ["e1:7", "e2:8"]
    monkeypatch.delenv("ETCD_ENDPOINTS")
    assert [e.netloc for e in parse_endpoints(None)] == ["127.0.0.1:2379"]


@pytest.mark.parametrize("bad", ["", " , ", "h:notaport", "ftp://h:1", "h:1/path"])
def test_bad_endpoints(bad: str) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_endpoints(bad)


def test_wrong_type() -> None:
    with pytest.raises(InvalidTypeError):
        parse_endpoints(2379)  # type: ignore[arg-type]
