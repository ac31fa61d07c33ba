"""A short tour of etcd-patterns against a throwaway etcd (or $ETCD_ENDPOINTS).

Run it with ``make demo``.
"""

from __future__ import annotations

import os
import threading
from contextlib import ExitStack

from etcd_patterns import EtcdPatterns
from etcd_patterns.testing import EtcdCluster


def main() -> None:
    with ExitStack() as stack:
        endpoints = os.environ.get("ETCD_ENDPOINTS")
        if not endpoints:
            cluster = stack.enter_context(EtcdCluster(size=1))
            endpoints = ",".join(cluster.endpoints)
            print(f"started a throwaway etcd at {endpoints}")
        etcd = stack.enter_context(EtcdPatterns.connect(endpoints, namespace="/demo/"))

        threads, rounds = 8, 25
        workers = [
            threading.Thread(
                target=lambda: [
                    etcd.transform("visits", lambda v: str(int(v) + 1), default="0")
                    for _ in range(rounds)
                ]
            )
            for _ in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        (visits,) = etcd.get_values("visits")
        print(f"{threads} threads x {rounds} transforms -> visits = {visits}")

        for name in ("alice", "bob", "carol"):
            etcd.transform(f"users/{name}", lambda _: "active", default="")
        print(f"users: {etcd.get_values('users')}")

        ok = visits == str(threads * rounds)
        print("counter exact" if ok else "COUNTER WRONG")
        etcd.transform("visits", lambda _: "0")
        raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
