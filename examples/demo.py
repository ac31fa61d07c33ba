"""A short tour of etcd-patterns against a throwaway etcd (or $ETCD_ENDPOINTS).

A producer enqueues jobs; four workers claim them, count each one with an
atomic transform, and every 50 jobs write a report under a lock, with a
fenced write. At the end the invariants are checked. Run it with
``make demo``.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

from etcd_patterns import EtcdPatterns, QueueEmptyError
from etcd_patterns.testing import EtcdCluster

JOBS = 200
WORKERS = 4


def incr(value: str) -> str:
    return str(int(value) + 1)


def summary(count: int, name: str) -> Callable[[str], str]:
    return lambda _: f"{count} jobs, by {name}"


def main() -> None:
    with ExitStack() as stack:
        endpoints = os.environ.get("ETCD_ENDPOINTS")
        if not endpoints:
            cluster = stack.enter_context(EtcdCluster(size=1))
            endpoints = ",".join(cluster.endpoints)
            print(f"started a throwaway etcd at {endpoints}")
        namespace = f"/demo/{os.getpid()}/"
        etcd = stack.enter_context(EtcdPatterns.connect(endpoints, namespace=namespace))

        started = time.monotonic()
        etcd.enqueue_many("jobs", [f"job-{i}" for i in range(JOBS)])
        print(f"enqueued {JOBS} jobs")

        processed: list[str] = []
        reports: list[tuple[float, float]] = []
        record = threading.Lock()

        def worker(name: str) -> None:
            with EtcdPatterns.connect(endpoints, namespace=namespace) as mine:
                while True:
                    try:
                        with mine.claim("jobs", timeout=0) as item:
                            count = int(mine.transform("done", incr, default="0"))
                            with record:
                                processed.append(item.value)
                    except QueueEmptyError:
                        return
                    if count % 50 == 0:
                        with mine.locked("report-lock", timeout=30) as held:
                            began = time.monotonic()
                            mine.transform("report", summary(count, name), guard=held, default="")
                            with record:
                                reports.append((began, time.monotonic()))

        threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(WORKERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        (done,) = etcd.get_values("done")
        overlaps = sum(1 for a, b in itertools.pairwise(sorted(reports)) if b[0] < a[1])
        checks = {
            "every job processed exactly once": sorted(processed)
            == sorted(f"job-{i}" for i in range(JOBS)),
            "the counter is exact": done == str(JOBS),
            "the queue is empty": etcd.get_values("jobs") == [],
            "report writers never overlapped": overlaps == 0,
        }
        elapsed = time.monotonic() - started
        print(f"{WORKERS} workers processed {len(processed)} jobs in {elapsed:.1f}s")
        print(f"last report: {etcd.get_values('report')[0]}")
        for check, ok in checks.items():
            print(f"  {'ok  ' if ok else 'FAIL'} {check}")
        raise SystemExit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
