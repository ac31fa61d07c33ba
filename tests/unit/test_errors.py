from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from etcd_patterns import (
    EtcdError,
    EtcdUnavailableError,
    LeaseNotFoundError,
    OutcomeUnknownError,
    PermissionDeniedError,
    ValueTooLargeError,
)
from etcd_patterns._errors import EtcdPatternsError, translate


class Status(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: "
    "ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused"
)
U = grpc.StatusCode


@pytest.mark.parametrize(
    ("code", "details", "write", "expected"),
    [
        (U.UNAVAILABLE, REFUSED, True, EtcdUnavailableError),
        (U.UNAVAILABLE, "etcdserver: no leader", True, EtcdUnavailableError),
        (U.RESOURCE_EXHAUSTED, "etcdserver: too many requests", True, EtcdUnavailableError),
        (U.UNAVAILABLE, "Socket closed", True, OutcomeUnknownError),
        (
            U.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: BAD_CERTIFICATE",
            False,
            PermissionDeniedError,
        ),
        (
            U.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNAVAILABLE: "
            "ipv4:127.0.0.1:1: Unwrap failed (TSI_DATA_CORRUPTED)",
            True,
            PermissionDeniedError,
        ),
        # TLS wording from a connection that broke mid-request is no
        # certificate problem: a write may have applied, a read is retried.
        (U.UNAVAILABLE, "Socket closed (SSL_ERROR_SYSCALL)", True, OutcomeUnknownError),
        (U.UNAVAILABLE, "Socket closed (SSL_ERROR_SYSCALL)", False, EtcdUnavailableError),
        (U.UNAVAILABLE, "etcdserver: leader changed", True, OutcomeUnknownError),
        (U.DEADLINE_EXCEEDED, "Deadline Exceeded", True, OutcomeUnknownError),
        (U.UNAVAILABLE, "etcdserver: request timed out", True, OutcomeUnknownError),
        (U.DEADLINE_EXCEEDED, "Deadline Exceeded", False, EtcdUnavailableError),
        (U.PERMISSION_DENIED, "etcdserver: permission denied", True, PermissionDeniedError),
        (
            U.INVALID_ARGUMENT,
            "etcdserver: authentication failed, invalid user ID or password",
            False,
            PermissionDeniedError,
        ),
        (U.UNAUTHENTICATED, "etcdserver: invalid auth token", False, PermissionDeniedError),
        (U.INVALID_ARGUMENT, "etcdserver: request is too large", True, ValueTooLargeError),
        (U.NOT_FOUND, "etcdserver: requested lease not found", True, LeaseNotFoundError),
        (
            U.OUT_OF_RANGE,
            "etcdserver: mvcc: required revision is a future revision",
            False,
            EtcdError,
        ),
    ],
)
def test_translation(
    code: grpc.StatusCode, details: str, write: bool, expected: type[Exception]
) -> None:
    error = translate(Status(code, details), endpoints=["h1:1", "h2:2"], write=write)
    assert type(error) is expected
    assert isinstance(error, EtcdPatternsError)


def test_unavailability_names_the_endpoints() -> None:
    error = translate(Status(U.UNAVAILABLE, REFUSED), endpoints=["h1:1", "h2:2"], write=False)
    assert "h1:1,h2:2" in str(error)


def test_an_interrupted_read_is_not_reported_as_an_unknown_write() -> None:
    error = translate(Status(U.UNAVAILABLE, "Socket closed"), endpoints=["h:1"], write=False)
    assert not isinstance(error, OutcomeUnknownError)


def test_other_exceptions_are_not_translated() -> None:
    assert translate(ValueError("bug"), endpoints=["h:1"], write=False) is None


def _tree(text: str) -> list[str]:
    """The lines of the first error tree drawn in ``text``, without indentation."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip() == "EtcdPatternsError")
    indent = lines[first].index("E")
    tree = []
    for line in lines[first:]:
        if not line.strip() or line.strip().startswith("```"):
            break
        tree.append(line[indent:].rstrip())
    return tree


def test_the_error_tree_in_the_docs_is_the_codes_and_names_every_error() -> None:
    import etcd_patterns
    from etcd_patterns import _errors

    root = Path(__file__).resolve().parents[2]
    drawn = _tree(_errors.__doc__ or "")
    assert _tree((root / "docs" / "reliability.md").read_text()) == drawn
    names = {line.lstrip("│├└─ ").split()[0] for line in drawn}
    public = {
        name
        for name in etcd_patterns.__all__
        if isinstance(getattr(etcd_patterns, name), type)
        and issubclass(getattr(etcd_patterns, name), EtcdPatternsError)
    }
    assert names == public
    for line in drawn[1:]:  # each is drawn under its real base class
        name = line.lstrip("│├└─ ").split()[0]
        depth = (len(line) - len(line.lstrip("│├└─ "))) // 4
        parent = next(
            other.lstrip("│├└─ ").split()[0]
            for other in reversed(drawn[: drawn.index(line)])
            if (len(other) - len(other.lstrip("│├└─ "))) // 4 == depth - 1
        )
        assert getattr(etcd_patterns, parent) in getattr(etcd_patterns, name).__bases__, name


def test_an_unknown_outcome_is_not_unavailability() -> None:
    # `except EtcdUnavailableError: retry` must never retry an ambiguous write.
    assert not issubclass(OutcomeUnknownError, EtcdUnavailableError)
