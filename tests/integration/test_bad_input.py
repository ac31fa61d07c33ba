"""Bad input gets a clear, typed error, and changes nothing in etcd."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from etcd_patterns import (
    ClosedError,
    EtcdPatterns,
    InvalidArgumentError,
    InvalidTypeError,
    NotALockError,
    NotAnElectionError,
    NotAValueError,
    ValueTooLargeError,
)
from etcd_patterns.testing import EtcdCluster, ExternalEtcd
from tests.helpers import Raw

BIG = "x" * 1_600_000  # over etcd's default 1.5 MiB request limit


def boom(value: str) -> str:
    raise RuntimeError("fn failed")


def ident(value: str) -> str:
    return value


def noop() -> None:
    pass


Call = Callable[[EtcdPatterns], object]

CASES: list[tuple[str, Call, type[BaseException]]] = [
    # get_values
    ("get None", lambda p: p.get_values(None), InvalidTypeError),  # type: ignore[arg-type]
    ("get int", lambda p: p.get_values(1), InvalidTypeError),  # type: ignore[arg-type]
    ("get empty", lambda p: p.get_values(""), InvalidArgumentError),
    ("get empty bytes", lambda p: p.get_values(b""), InvalidArgumentError),
    ("get trailing slash", lambda p: p.get_values("dir/"), InvalidArgumentError),
    ("get non-UTF-8 key", lambda p: p.get_values(b"\xff"), InvalidArgumentError),
    ("get reserved key", lambda p: p.get_values(".etcd-patterns/x"), InvalidArgumentError),
    # try_transform
    ("try None key", lambda p: p.try_transform(None, ident), InvalidTypeError),  # type: ignore[arg-type]
    ("try int key", lambda p: p.try_transform(7, ident), InvalidTypeError),  # type: ignore[arg-type]
    ("try empty key", lambda p: p.try_transform("", ident), InvalidArgumentError),
    ("try trailing slash", lambda p: p.try_transform("k/", ident), InvalidArgumentError),
    ("try fn None", lambda p: p.try_transform("k", None), InvalidTypeError),  # type: ignore[arg-type]
    ("try fn str", lambda p: p.try_transform("k", "x"), InvalidTypeError),  # type: ignore[arg-type]
    ("try fn raises", lambda p: p.try_transform("k", boom), RuntimeError),
    ("try fn returns int", lambda p: p.try_transform("k", lambda v: 1), InvalidTypeError),  # type: ignore[arg-type,return-value]
    ("try fn returns None", lambda p: p.try_transform("k", lambda v: None), InvalidTypeError),  # type: ignore[arg-type,return-value]
    ("try fn returns bytes", lambda p: p.try_transform("k", lambda v: b"1"), InvalidTypeError),  # type: ignore[arg-type,return-value]
    ("try fn surrogate", lambda p: p.try_transform("k", lambda v: "\udc80"), InvalidArgumentError),
    ("try oversized", lambda p: p.try_transform("k", lambda v: BIG), ValueTooLargeError),
    ("try default int", lambda p: p.try_transform("new", ident, default=0), InvalidTypeError),  # type: ignore[arg-type]
    (
        "try default non-UTF-8",
        lambda p: p.try_transform("new", ident, default=b"\xff"),
        InvalidArgumentError,
    ),
    ("try missing", lambda p: p.try_transform("missing", ident), KeyError),
    ("try directory", lambda p: p.try_transform("dir", ident, default="0"), NotAValueError),
    # transform
    ("transform None key", lambda p: p.transform(None, ident), InvalidTypeError),  # type: ignore[arg-type]
    ("transform empty key", lambda p: p.transform("", ident), InvalidArgumentError),
    ("transform fn int", lambda p: p.transform("k", 3), InvalidTypeError),  # type: ignore[arg-type]
    ("transform fn raises", lambda p: p.transform("k", boom), RuntimeError),
    ("transform fn returns int", lambda p: p.transform("k", lambda v: 2), InvalidTypeError),  # type: ignore[arg-type,return-value]
    ("transform oversized", lambda p: p.transform("k", lambda v: BIG), ValueTooLargeError),
    ("transform timeout -1", lambda p: p.transform("k", ident, timeout=-1), InvalidArgumentError),
    (
        "transform timeout NaN",
        lambda p: p.transform("k", ident, timeout=float("nan")),
        InvalidArgumentError,
    ),
    ("transform timeout str", lambda p: p.transform("k", ident, timeout="1"), InvalidTypeError),  # type: ignore[arg-type]
    ("transform timeout bool", lambda p: p.transform("k", ident, timeout=True), InvalidTypeError),
    ("transform default int", lambda p: p.transform("new", ident, default=5), InvalidTypeError),  # type: ignore[arg-type]
    ("transform guard str", lambda p: p.transform("k", ident, guard="L"), InvalidTypeError),  # type: ignore[arg-type]
    # lock / try_lock
    ("lock None name", lambda p: p.lock(None, noop), InvalidTypeError),  # type: ignore[arg-type]
    ("lock empty name", lambda p: p.lock("", noop), InvalidArgumentError),
    ("lock block None", lambda p: p.lock("L", None), InvalidTypeError),  # type: ignore[arg-type]
    ("lock block str", lambda p: p.lock("L", "noop"), InvalidTypeError),  # type: ignore[arg-type]
    ("lock ttl 0", lambda p: p.lock("L", noop, ttl=0), InvalidArgumentError),
    ("lock ttl negative", lambda p: p.lock("L", noop, ttl=-1), InvalidArgumentError),
    ("lock ttl NaN", lambda p: p.lock("L", noop, ttl=float("nan")), InvalidArgumentError),
    ("lock ttl str", lambda p: p.lock("L", noop, ttl="5"), InvalidTypeError),  # type: ignore[arg-type]
    ("lock timeout negative", lambda p: p.lock("L", noop, timeout=-1), InvalidArgumentError),
    ("lock timeout NaN", lambda p: p.lock("L", noop, timeout=float("nan")), InvalidArgumentError),
    ("lock timeout str", lambda p: p.lock("L", noop, timeout="1"), InvalidTypeError),  # type: ignore[arg-type]
    ("lock name is a value", lambda p: p.lock("k", noop), NotALockError),
    ("try_lock empty name", lambda p: p.try_lock("", noop), InvalidArgumentError),
    ("try_lock block int", lambda p: p.try_lock("L", 1), InvalidTypeError),  # type: ignore[arg-type]
    ("try_lock ttl 0", lambda p: p.try_lock("L", noop, ttl=0), InvalidArgumentError),
    ("try_lock name is a value", lambda p: p.try_lock("k", noop), NotALockError),
    ("locked empty name", lambda p: p.locked("").__enter__(), InvalidArgumentError),
    ("try_locked ttl str", lambda p: p.try_locked("L", ttl="x").__enter__(), InvalidTypeError),  # type: ignore[arg-type]
    # read-write lock
    ("read_locked None name", lambda p: p.read_locked(None).__enter__(), InvalidTypeError),  # type: ignore[arg-type]
    ("read_locked empty name", lambda p: p.read_locked("").__enter__(), InvalidArgumentError),
    ("read_locked ttl 0", lambda p: p.read_locked("RW", ttl=0).__enter__(), InvalidArgumentError),
    (
        "read_locked timeout str",
        lambda p: p.read_locked("RW", timeout="1").__enter__(),  # type: ignore[arg-type]
        InvalidTypeError,
    ),
    ("read_locked name is a value", lambda p: p.read_locked("k").__enter__(), NotALockError),
    ("write_locked empty name", lambda p: p.write_locked("").__enter__(), InvalidArgumentError),
    (
        "write_locked timeout -1",
        lambda p: p.write_locked("RW", timeout=-1).__enter__(),
        InvalidArgumentError,
    ),
    ("write_locked name is a value", lambda p: p.write_locked("k").__enter__(), NotALockError),
    # barriers
    ("barrier None name", lambda p: p.barrier(None), InvalidTypeError),  # type: ignore[arg-type]
    ("barrier empty name", lambda p: p.barrier(""), InvalidArgumentError),
    ("barrier trailing slash", lambda p: p.barrier("gate/"), InvalidArgumentError),
    ("barrier hold ttl 0", lambda p: p.barrier("gate").hold(ttl=0), InvalidArgumentError),
    ("barrier wait timeout -1", lambda p: p.barrier("gate").wait(timeout=-1), InvalidArgumentError),
    ("double_barrier empty name", lambda p: p.double_barrier("", 2), InvalidArgumentError),
    ("double_barrier count 0", lambda p: p.double_barrier("DB", 0), InvalidArgumentError),
    ("double_barrier count bool", lambda p: p.double_barrier("DB", True), InvalidTypeError),
    ("double_barrier count str", lambda p: p.double_barrier("DB", "2"), InvalidTypeError),  # type: ignore[arg-type]
    ("double_barrier ttl 0", lambda p: p.double_barrier("DB", 2, ttl=0), InvalidArgumentError),
    (
        "double_barrier timeout NaN",
        lambda p: p.double_barrier("DB", 2, timeout=float("nan")),
        InvalidArgumentError,
    ),
    # semaphore and contenders
    ("semaphore None name", lambda p: p.semaphore(None, 2).__enter__(), InvalidTypeError),  # type: ignore[arg-type]
    ("semaphore empty name", lambda p: p.semaphore("", 2).__enter__(), InvalidArgumentError),
    ("semaphore limit 0", lambda p: p.semaphore("S", 0).__enter__(), InvalidArgumentError),
    ("semaphore limit -1", lambda p: p.semaphore("S", -1).__enter__(), InvalidArgumentError),
    ("semaphore limit bool", lambda p: p.semaphore("S", True).__enter__(), InvalidTypeError),
    ("semaphore limit str", lambda p: p.semaphore("S", "3").__enter__(), InvalidTypeError),  # type: ignore[arg-type]
    ("semaphore limit float", lambda p: p.semaphore("S", 2.0).__enter__(), InvalidTypeError),  # type: ignore[arg-type]
    ("semaphore ttl 0", lambda p: p.semaphore("S", 2, ttl=0).__enter__(), InvalidArgumentError),
    (
        "semaphore timeout NaN",
        lambda p: p.semaphore("S", 2, timeout=float("nan")).__enter__(),
        InvalidArgumentError,
    ),
    ("semaphore name is a value", lambda p: p.semaphore("k", 2).__enter__(), NotALockError),
    ("contenders empty name", lambda p: p.contenders(""), InvalidArgumentError),
    ("contenders int name", lambda p: p.contenders(1), InvalidTypeError),  # type: ignore[arg-type]
    # election
    ("elected None name", lambda p: p.elected(None, "v").__enter__(), InvalidTypeError),  # type: ignore[arg-type]
    ("elected empty name", lambda p: p.elected("", "v").__enter__(), InvalidArgumentError),
    (
        "elected reserved name",
        lambda p: p.elected(".etcd-patterns/e", "v").__enter__(),
        InvalidArgumentError,
    ),
    ("elected int value", lambda p: p.elected("E", 1).__enter__(), InvalidTypeError),  # type: ignore[arg-type]
    ("elected None value", lambda p: p.elected("E", None).__enter__(), InvalidTypeError),  # type: ignore[arg-type]
    (
        "elected non-UTF-8 value",
        lambda p: p.elected("E", b"\xff").__enter__(),
        InvalidArgumentError,
    ),
    ("elected oversized value", lambda p: p.elected("E", BIG).__enter__(), ValueTooLargeError),
    ("elected ttl 0", lambda p: p.elected("E", "v", ttl=0).__enter__(), InvalidArgumentError),
    ("elected ttl str", lambda p: p.elected("E", "v", ttl="5").__enter__(), InvalidTypeError),  # type: ignore[arg-type]
    (
        "elected timeout NaN",
        lambda p: p.elected("E", "v", timeout=float("nan")).__enter__(),
        InvalidArgumentError,
    ),
    (
        "elected timeout str",
        lambda p: p.elected("E", "v", timeout="1").__enter__(),  # type: ignore[arg-type]
        InvalidTypeError,
    ),
    ("elected name is a value", lambda p: p.elected("k", "v").__enter__(), NotAnElectionError),
    ("leader empty name", lambda p: p.leader(""), InvalidArgumentError),
    ("leader int name", lambda p: p.leader(3), InvalidTypeError),  # type: ignore[arg-type]
    ("observe empty name", lambda p: p.observe(""), InvalidArgumentError),
    ("observe timeout -1", lambda p: p.observe("E", timeout=-1), InvalidArgumentError),
    ("observe timeout str", lambda p: p.observe("E", timeout="1"), InvalidTypeError),  # type: ignore[arg-type]
    # queue
    ("enqueue None dir", lambda p: p.enqueue(None, "v"), InvalidTypeError),  # type: ignore[arg-type]
    ("enqueue empty dir", lambda p: p.enqueue("", "v"), InvalidArgumentError),
    ("enqueue trailing slash", lambda p: p.enqueue("q/", "v"), InvalidArgumentError),
    ("enqueue int value", lambda p: p.enqueue("q", 5), InvalidTypeError),  # type: ignore[arg-type]
    ("enqueue None value", lambda p: p.enqueue("q", None), InvalidTypeError),  # type: ignore[arg-type]
    ("enqueue non-UTF-8 value", lambda p: p.enqueue("q", b"\xff"), InvalidArgumentError),
    ("enqueue oversized", lambda p: p.enqueue("q", BIG), ValueTooLargeError),
    ("enqueue ttl 0", lambda p: p.enqueue("q", "v", ttl=0), InvalidArgumentError),
    ("enqueue ttl negative", lambda p: p.enqueue("q", "v", ttl=-2), InvalidArgumentError),
    ("enqueue ttl NaN", lambda p: p.enqueue("q", "v", ttl=float("nan")), InvalidArgumentError),
    ("enqueue ttl str", lambda p: p.enqueue("q", "v", ttl="1"), InvalidTypeError),  # type: ignore[arg-type]
    ("enqueue dir is a value", lambda p: p.enqueue("k", "v"), NotAValueError),
    ("enqueue_many a str", lambda p: p.enqueue_many("q", "abc"), InvalidTypeError),
    ("enqueue_many int item", lambda p: p.enqueue_many("q", ["a", 1]), InvalidTypeError),  # type: ignore[list-item]
    ("dequeue empty dir", lambda p: p.dequeue("", timeout=0), InvalidArgumentError),
    ("dequeue timeout negative", lambda p: p.dequeue("q", timeout=-1), InvalidArgumentError),
    ("dequeue dir is a value", lambda p: p.dequeue("k", timeout=0), NotAValueError),
    ("dequeue_many 0", lambda p: p.dequeue_many("q", 0, timeout=0), InvalidArgumentError),
    ("dequeue_many str", lambda p: p.dequeue_many("q", "3", timeout=0), InvalidTypeError),  # type: ignore[call-overload]
    ("dequeue_many bool", lambda p: p.dequeue_many("q", True, timeout=0), InvalidTypeError),
    ("claim timeout NaN", lambda p: p.claim("q", timeout=float("nan")), InvalidArgumentError),
    ("claim ttl 0", lambda p: p.claim("q", ttl=0), InvalidArgumentError),
    ("claim dir is a value", lambda p: p.claim("k", timeout=0).__enter__(), NotAValueError),
]


@pytest.fixture
def seeded(patterns: EtcdPatterns, raw: Raw) -> tuple[EtcdPatterns, Raw]:
    raw.put("k", "1")
    raw.put("dir/child", "c")
    patterns.transform("k", ident)  # the session exists before the revision is taken
    return patterns, raw


@pytest.mark.parametrize(("call", "error"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_and_changes_nothing(
    seeded: tuple[EtcdPatterns, Raw], call: Call, error: type[BaseException]
) -> None:
    patterns, raw = seeded
    before = raw.revision()
    with pytest.raises(error):
        call(patterns)
    assert raw.revision() == before
    assert raw.value("k") == b"1"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": 0},
        {"timeout": -1},
        {"timeout": float("nan")},
        {"timeout": "5"},
        {"session_ttl": 0},
        {"session_ttl": -3},
        {"session_ttl": float("nan")},
        {"session_ttl": "10"},
        {"namespace": 5},
        {"namespace": b"\xff"},
        {"max_request_bytes": 0},
        {"max_request_bytes": "1"},
        {"prefetch": 0},
        {"prefetch": 2.5},
    ],
    ids=repr,
)
def test_bad_construction(etcd: EtcdCluster | ExternalEtcd, kwargs: dict[str, Any]) -> None:
    with pytest.raises((InvalidArgumentError, InvalidTypeError)):
        EtcdPatterns.connect(etcd.endpoints, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cert_key": "k.pem"},
        {"cert_key": "k.pem", "cert_cert": "c.pem"},
        {"user": "root"},
        {"password": "secret"},
    ],
    ids=repr,
)
def test_inconsistent_credentials(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        EtcdPatterns.connect("127.0.0.1:1", **kwargs)


def test_use_after_close(etcd: EtcdCluster | ExternalEtcd, namespace: str, raw: Raw) -> None:
    patterns = EtcdPatterns.connect(etcd.endpoints, namespace=namespace)
    patterns.close()
    before = raw.revision()
    with pytest.raises(ClosedError):
        patterns.get_values("k")
    with pytest.raises(RuntimeError):
        patterns.transform("k", ident, default="0")
    assert raw.revision() == before


def test_values_near_the_limit(
    etcd: EtcdCluster | ExternalEtcd, patterns: EtcdPatterns, raw: Raw
) -> None:
    near = "n" * 1_570_000
    assert patterns.transform("big", lambda v: near, default="") == near
    assert raw.value("big") == near.encode()


def test_server_side_limit_is_the_same_error(
    etcd: EtcdCluster | ExternalEtcd, namespace: str, raw: Raw
) -> None:
    # Told the server accepts more than it does, the library sends; etcd refuses.
    with EtcdPatterns.connect(
        etcd.endpoints, namespace=namespace, max_request_bytes=4 * 1024 * 1024
    ) as patterns:
        before = raw.revision()
        with pytest.raises(ValueTooLargeError, match="too large"):
            patterns.transform("k", lambda v: BIG, default="")
        assert raw.revision() == before
