"""Keys, values and the namespace.

Keys and values leave the library as `str`. They enter as `str`, or as
`bytes` that are valid UTF-8, so that whatever is written can be read back.
Every check here runs before a request is built, so invalid input never
reaches etcd.

A namespace is a raw prefix, exactly as etcd's own namespace client and
``grpc-proxy --namespace`` treat it: with ``namespace="/app/"`` the key
``"jobs"`` is stored as ``"/app/jobs"``.

A "directory" is the set of keys under ``key + "/"``; its direct children are
the keys ``key/child`` with no further ``/``. The library's own bookkeeping
keys live under ``<namespace>.etcd-patterns/``, which user keys may not use.
"""

from __future__ import annotations

from ._errors import InvalidArgumentError, InvalidTypeError, ValueDecodeError

RESERVED = b".etcd-patterns/"


def prefix_end(prefix: bytes) -> bytes:
    r"""The smallest key greater than every key that starts with ``prefix``.

    A range ``[prefix, prefix_end(prefix))`` covers exactly the keys with
    that prefix. For an empty or all-``0xff`` prefix this is ``b"\0"``,
    which etcd reads as "to the end of the keyspace".
    """
    for i in range(len(prefix) - 1, -1, -1):
        if prefix[i] < 0xFF:
            return prefix[:i] + bytes([prefix[i] + 1])
    return b"\0"


def _utf8(data: object, *, name: str) -> bytes:
    if isinstance(data, str):
        try:
            return data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidArgumentError(f"{name} {data!r} cannot be encoded as UTF-8") from exc
    if isinstance(data, bytes):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgumentError(f"{name} {data!r} is not valid UTF-8") from exc
        return data
    raise InvalidTypeError(f"{name} must be str or UTF-8 bytes, not {type(data).__name__}")


def encode_value(value: object, *, name: str = "value") -> bytes:
    """Validate and encode a value to store."""
    return _utf8(value, name=name)


def decode_value(raw: bytes, *, key: str) -> str:
    """Decode a stored value, refusing data that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueDecodeError(key, raw) from exc


def encode_segment(segment: object, *, name: str) -> bytes:
    """Validate one segment of a key, such as a member's id: UTF-8, not empty, no ``/``."""
    raw = _utf8(segment, name=name)
    if not raw:
        raise InvalidArgumentError(f"{name} must not be empty")
    if b"/" in raw:
        raise InvalidArgumentError(f"{name} {segment!r} must not contain '/'")
    return raw


class Keyspace:
    """Maps user keys to etcd keys under a namespace prefix.

    Args:
        namespace: A prefix for every key, or None for none.
    """

    __slots__ = ("prefix",)

    def __init__(self, namespace: object = None) -> None:
        self.prefix = b"" if namespace is None else _utf8(namespace, name="namespace")

    def encode(self, key: object, *, name: str = "key", trailing_slash: bool = False) -> bytes:
        """Validate ``key`` and return the etcd key it names.

        Args:
            key: The user's key.
            name: What the key is, for error messages.
            trailing_slash: Accept a key ending with ``/``. Lock names may:
                etcd's own clients accept ``/my-lock/`` (whose contenders
                are ``/my-lock//<lease>``), and a lock must be able to name
                every lock they can.

        Raises:
            InvalidTypeError: ``key`` is not str or bytes.
            InvalidArgumentError: ``key`` is empty, ends with ``/``, is not
                UTF-8, or uses the reserved ``.etcd-patterns/`` prefix.
        """
        raw = _utf8(key, name=name)
        if not raw:
            raise InvalidArgumentError(f"{name} must not be empty")
        if raw.endswith(b"/") and not trailing_slash:
            raise InvalidArgumentError(
                f"{name} {key!r} must not end with '/'; name the directory without it"
            )
        if raw.startswith(RESERVED):
            raise InvalidArgumentError(f"{name} {key!r} uses the reserved prefix {RESERVED!r}")
        return self.prefix + raw

    def decode(self, raw: bytes) -> str:
        """The user's key for an etcd key inside the namespace."""
        return raw[len(self.prefix) :].decode("utf-8", errors="replace")

    def internal(self, *parts: str) -> bytes:
        """An etcd key for the library's own bookkeeping."""
        return self.prefix + RESERVED + "/".join(parts).encode("ascii")


def children_range(key: bytes) -> tuple[bytes, bytes]:
    """The ``[start, end)`` range of every key under the directory ``key``."""
    start = key + b"/"
    return start, prefix_end(start)


def is_direct_child(parent: bytes, key: bytes) -> bool:
    """Whether ``key`` is ``parent/child`` with no further ``/``."""
    return b"/" not in key[len(parent) + 1 :]
