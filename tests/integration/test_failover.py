"""Transforms and waits keep working, exactly, while members of a 3-node cluster die."""

from __future__ import annotations

import threading
from contextlib import ExitStack

import pytest

from etcd_patterns import EtcdPatterns
from etcd_patterns.testing import EtcdCluster
from tests.helpers import wait_until


def incr(value: str) -> str:
    return str(int(value) + 1)


@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_counter_is_exact_while_each_member_is_killed_in_turn(namespace: str) -> None:
    with (
        EtcdCluster(size=3) as cluster,
        EtcdPatterns.connect(cluster.endpoints, namespace=namespace, timeout=5) as etcd,
    ):
        done = [0, 0]  # increments per worker
        progress = threading.Condition()
        stop = threading.Event()
        errors: list[BaseException] = []

        def work(me: int) -> None:
            try:
                while not stop.is_set():
                    etcd.transform("counter", incr, default="0")
                    with progress:
                        done[me] += 1
                        progress.notify_all()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                with progress:
                    progress.notify_all()

        def advance(by: int) -> None:
            # Every worker must get on again before the next fault: a write
            # caught by two failovers in a row may not be settled within one
            # timeout, and then honestly reports OutcomeUnknownError.
            with progress:
                targets = [count + by for count in done]
                assert progress.wait_for(
                    lambda: all(n >= t for n, t in zip(done, targets, strict=True)) or bool(errors),
                    timeout=30,
                )
            assert errors == []

        workers = [threading.Thread(target=work, args=(me,)) for me in range(2)]
        for worker in workers:
            worker.start()
        try:
            advance(10)
            for node in cluster.nodes:  # so the member in use dies at some point
                node.kill()
                advance(10)
                node.restart()
                advance(10)
            cluster.leader().kill()
            advance(10)
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=30)
        assert errors == []
        assert etcd.get_values("counter") == [str(sum(done))]


@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_waits_keep_their_place_while_members_die(namespace: str) -> None:
    with EtcdCluster(size=3) as cluster, ExitStack() as stack:
        holder, first, second, consumer = (
            stack.enter_context(EtcdPatterns.connect(cluster.endpoints, namespace=namespace))
            for _ in range(4)
        )
        order: list[str] = []
        received: list[str] = []
        threads = [
            threading.Thread(target=first.lock, args=("L", lambda: order.append("first"))),
            threading.Thread(target=second.lock, args=("L", lambda: order.append("second"))),
            threading.Thread(target=lambda: received.append(consumer.dequeue("q", timeout=60))),
        ]
        with holder.locked("L"):
            for waiters, thread in enumerate(threads[:2], start=2):
                thread.start()
                wait_until(lambda: len(holder.get_values("L")) == waiters)  # noqa: B023
            threads[2].start()
            for node in cluster.nodes:  # so every waiter's member dies at some point
                node.kill()
                node.restart()
        holder.enqueue("q", "after the failovers")
        for thread in threads:
            thread.join(timeout=60)
        assert order == ["first", "second"]
        assert received == ["after the failovers"]
