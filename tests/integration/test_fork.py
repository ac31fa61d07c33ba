"""An instance across fork: a child never touches its parent's lease or connections.

This is what gunicorn ``--preload``, Celery's prefork pool and
``multiprocessing`` with the fork start method do: a child inherits an
instance its parent made, used or not.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from etcd_patterns import EtcdPatterns, ForkedProcessError
from etcd_patterns.testing import EtcdCluster, ExternalEtcd
from tests.helpers import Raw

ROUNDS = 10


def _every_use_is_refused(instance: EtcdPatterns) -> list[str]:
    """Try each kind of call on an inherited instance; what was not refused."""
    attempts: dict[str, Callable[[], object]] = {
        "transform": lambda: instance.transform("k", lambda v: v + "child", default=""),
        "lock": lambda: instance.lock("L", lambda: None, timeout=1),
        "try_lock": lambda: instance.try_lock("L", lambda: None),
        "enqueue": lambda: instance.enqueue("q", "from the child"),
        "claim": lambda: instance.claim("q", timeout=0).__enter__(),
        "get_values": lambda: instance.get_values("k"),
    }
    accepted = []
    for name, attempt in attempts.items():
        try:
            attempt()
        except ForkedProcessError:
            continue
        accepted.append(name)
    return accepted


def _child(
    inherited: EtcdPatterns, endpoints: list[str], namespace: str, start: Any, results: Any
) -> None:
    try:
        accepted = _every_use_is_refused(inherited)
        inherited.close()  # must leave the parent's lease and connections alone
        start.wait(timeout=30)
        with EtcdPatterns.connect(endpoints, namespace=namespace) as mine:
            for _ in range(ROUNDS):
                mine.lock("L", lambda: None, timeout=30)
                mine.transform("count", lambda v: str(int(v) + 1), default="0")
            with mine.claim("jobs", timeout=30) as item:
                claimed = item.value
        results.put((accepted, claimed))
    except BaseException as exc:
        results.put(([repr(exc)], None))
        raise


def _run_children(
    inherited: EtcdPatterns, etcd: EtcdCluster | ExternalEtcd, namespace: str
) -> list[Any]:
    # Forked, so each child gets the very instance, not a pickled copy.
    context = multiprocessing.get_context("fork")
    start = context.Barrier(2)
    results = context.Queue()
    children = [
        context.Process(
            target=_child, args=(inherited, list(etcd.endpoints), namespace, start, results)
        )
        for _ in range(2)
    ]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=90) for _ in children]
    for child in children:
        child.join(timeout=30)
    assert [child.exitcode for child in children] == [0, 0]
    return outcomes


@pytest.mark.timeout(120)
@pytest.mark.parametrize("used_before_fork", [True, False], ids=["used", "unused"])
def test_forked_children_refuse_the_inherited_instance_and_work_with_their_own(
    etcd: EtcdCluster | ExternalEtcd, namespace: str, raw: Raw, used_before_fork: bool
) -> None:
    with EtcdPatterns.connect(etcd.endpoints, namespace=namespace) as parent:
        parent.enqueue_many("jobs", ["one", "two"])
        holding = parent.locked("held by the parent") if used_before_fork else None
        held = holding.__enter__() if holding is not None else None
        outcomes = _run_children(parent, etcd, namespace)
        # Every call on the inherited instance was refused before reaching etcd.
        assert [accepted for accepted, _ in outcomes] == [[], []]
        assert raw.value("k") is None
        assert raw.count("q") == 0
        # Each child made its own instance, and the two never deadlocked.
        assert raw.value("count") == str(2 * ROUNDS).encode()
        assert sorted(claimed for _, claimed in outcomes) == ["one", "two"]
        if held is not None and holding is not None:
            # The children's close() left the parent's lock, lease and channels alone.
            assert held.is_owner()
            assert not held.lost.is_set()
            assert raw.count("held by the parent/") == 1
            holding.__exit__(None, None, None)
        assert parent.transform("k", lambda v: v + "parent", default="") == "parent"


def test_a_child_exiting_normally_leaves_the_parents_lease_alone(
    etcd: EtcdCluster | ExternalEtcd, namespace: str, raw: Raw
) -> None:
    # A gunicorn worker exits through sys.exit, so exit hooks run in the child.
    script = textwrap.dedent(
        """
        import os, sys
        from etcd_patterns import EtcdPatterns

        etcd = EtcdPatterns.connect(sys.argv[1], namespace=sys.argv[2])
        held = etcd.locked("L").__enter__()
        child = os.fork()
        if child == 0:
            sys.exit(0)  # runs the exit hooks, which close open sessions
        _, status = os.waitpid(child, 0)
        print(os.waitstatus_to_exitcode(status), held.is_owner(), held.lost.is_set())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, ",".join(etcd.endpoints), namespace],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "True", "False"]
    assert raw.count("L/") == 0  # and the parent's own exit freed the lock
