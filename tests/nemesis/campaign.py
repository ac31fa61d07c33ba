"""Campaigns: workloads run against a proxied cluster while the nemesis strikes.

``python -m tests.nemesis.campaign --seeds 1-30 --duration 60`` runs every
workload under every seed and prints a table; with ``--write-docs`` it also
puts the table into docs/reliability.md. It exits non-zero on a violation,
printing the seed, the schedule and the offending operations.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import etcd3
from etcd3 import etcdrpc

from etcd_patterns import EtcdPatterns, QueueEmptyError
from etcd_patterns.testing import EtcdCluster
from tests.nemesis import checkers
from tests.nemesis.history import Recorder, load
from tests.nemesis.schedule import Nemesis, draw
from tests.nemesis.workloads import (
    BOUNDS,
    GROUP,
    ITEMS,
    MAX_DELIVERIES,
    NAMESPACE,
    PARTICIPANTS,
    SEMAPHORE_LIMIT,
    SESSION_TTL,
    TIMEOUT,
    WORKLOADS,
    claim_one,
)

DOCS_BEGIN = "<!-- nemesis campaign: begin -->"
DOCS_END = "<!-- nemesis campaign: end -->"


@dataclass
class Run:
    """What one workload under one seed did and what the checkers found."""

    workload: str
    seed: int
    duration: float
    operations: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    verdicts: list[checkers.Verdict] = field(default_factory=list)
    schedule: list[str] = field(default_factory=list)
    history: str = ""  # where the recorded history is kept, if a checker failed

    @property
    def violations(self) -> list[str]:
        return [f"{v.checker}: {line}" for v in self.verdicts for line in v.violations]

    @property
    def unknown(self) -> int:
        return self.operations["unknown"]

    @property
    def worst_overrun(self) -> float:
        overruns = [
            value
            for verdict in self.verdicts
            if verdict.checker == "timeouts"
            for value in verdict.counts.values()
        ]
        return max(overruns, default=float("-inf"))


def run(workload: str, seed: int, duration: float) -> Run:
    """One workload, under the schedule drawn from ``seed``, for ``duration`` seconds."""
    result = Run(workload, seed, duration)
    context = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="nemesis-") as scratch,
        EtcdCluster(size=3, proxied=True, seed=seed) as cluster,
    ):
        directory = Path(scratch)
        stop = context.Event()
        workers = [
            context.Process(
                target=target,
                args=(cluster.endpoints, str(directory / f"{i}.jsonl"), f"p{i}", stop),
            )
            for i, target in enumerate(WORKLOADS[workload])
        ]
        nemesis = Nemesis(cluster, draw(seed, duration, len(cluster.nodes)))
        try:
            for worker in workers:
                worker.start()
            nemesis.start()
            time.sleep(duration)  # the campaign's length: the nemesis runs meanwhile
        finally:
            stop.set()
            for worker in workers:
                if worker.pid is not None:
                    worker.join(timeout=max(BOUNDS.values()) + 30)
            nemesis.stop()  # every fault healed, every member healthy
            still = [w for w in workers if w.is_alive()]
            for worker in still:
                worker.kill()
        result.faults = nemesis.injected
        result.schedule = nemesis.log
        final = _finish(workload, cluster, directory)
        history = load(directory)
        result.history = str(directory)
        result.operations = Counter(op.outcome for op in history)
        result.operations["total"] = len(history)
        result.verdicts = _judge(workload, history, final)
        if still:
            result.verdicts.append(
                checkers.Verdict("liveness", [f"{len(still)} client processes did not stop"])
            )
        if [w.exitcode for w in workers if not w.is_alive()] != [0] * (len(workers) - len(still)):
            result.verdicts.append(
                checkers.Verdict("liveness", [f"client exit codes {[w.exitcode for w in workers]}"])
            )
        if result.violations:
            kept = Path(tempfile.mkdtemp(prefix=f"nemesis-{workload}-{seed}-"))
            shutil.copytree(directory, kept, dirs_exist_ok=True)
            result.history = str(kept)
    return result


def _finish(workload: str, cluster: EtcdCluster, directory: Path) -> dict[str, Any]:
    """After the faults: drain the queue, read the counter; what the checkers need."""
    endpoints = cluster.direct_endpoints
    if workload in ("queue", "claims"):
        recorder = Recorder(directory / "drain.jsonl", "drain")
        # Claims of clients gone with their sessions expire within the TTL.
        # Bounded: a drain that keeps failing must not hang the campaign.
        until = time.monotonic() + 120
        with EtcdPatterns.connect(endpoints, namespace=NAMESPACE, timeout=TIMEOUT) as etcd:
            while time.monotonic() < until:
                if workload == "queue":
                    with recorder.op("dequeue") as op:
                        op.value = etcd.dequeue("q", timeout=SESSION_TTL + 2)
                    if op.error == QueueEmptyError.__name__:
                        break
                elif not claim_one(etcd, recorder, release=False, timeout=SESSION_TTL + 2):
                    break
        recorder.close()
    host, port = endpoints[0].rsplit(":", 1)
    client = etcd3.client(host=host, port=int(port), timeout=10)
    try:
        members = _final_members(client) if workload == "partition" else {}

        def values(directory: str) -> list[str]:
            prefix = (NAMESPACE + directory + "/").encode()
            end = etcd3.utils.prefix_range_end(prefix)
            found = client.kvstub.Range(etcdrpc.RangeRequest(key=prefix, range_end=end), 10).kvs
            return [bytes(kv.value).decode() for kv in found]

        remaining, dead = values("q"), values("q.dead")
        counter = client.get(NAMESPACE + "counter")[0]
    finally:
        client.close()
    return {
        "remaining": remaining,
        "dead": dead,
        "counter": int(counter) if counter else 0,
        "members": members,
    }


def _final_members(client: Any) -> dict[str, int]:
    """The partition group's members, with their keys' create revisions, once it is empty.

    A member whose process could not revoke its lease leaves within the
    TTL: wait that long for the group to empty.
    """
    group = (NAMESPACE + GROUP + "/").encode()
    until = time.monotonic() + SESSION_TTL + 2
    while True:
        found = client.kvstub.Range(
            etcdrpc.RangeRequest(key=group, range_end=etcd3.utils.prefix_range_end(group)), 10
        ).kvs
        # Members as the library counts them: direct children on a lease.
        members = {
            kv.key[len(group) :].decode(): kv.create_revision
            for kv in found
            if kv.lease and b"/" not in kv.key[len(group) :]
        }
        if not members or time.monotonic() > until:
            return members
        time.sleep(0.2)  # polling etcd for the leases' expiry


def _judge(workload: str, history: list[Any], final: dict[str, Any]) -> list[checkers.Verdict]:
    verdicts = [checkers.check_timeouts(history)]
    if workload == "counter":
        verdicts += [
            checkers.check_counter(history, final["counter"]),
            checkers.check_watch(history, final["counter"]),
        ]
    elif workload == "lock":
        verdicts.append(checkers.check_lock(history))
    elif workload == "election":
        verdicts += [checkers.check_lock(history), checkers.check_observer(history)]
    elif workload == "semaphore":
        verdicts.append(checkers.check_semaphore(history, SEMAPHORE_LIMIT))
    elif workload == "rwlock":
        verdicts.append(checkers.check_rwlock(history))
    elif workload == "barrier":
        verdicts.append(checkers.check_double_barrier(history, PARTICIPANTS))
    elif workload == "queue":
        verdicts.append(checkers.check_queue(history, final["remaining"]))
    elif workload == "claims":
        verdicts.append(
            checkers.check_claims(history, final["remaining"], final["dead"], MAX_DELIVERIES)
        )
    elif workload == "partition":
        verdicts.append(checkers.check_partition(history, ITEMS, final["members"]))
    return verdicts


def table(runs: list[Run]) -> str:
    """The campaign's summary, as a Markdown table."""
    lines = [
        "| workload | seeds | operations | unknown outcomes | faults injected | violations "
        "| worst timeout overrun |",
        "|---|---|---|---|---|---|---|",
    ]
    for workload in sorted({r.workload for r in runs}):
        mine = [r for r in runs if r.workload == workload]
        faults: Counter[str] = Counter()
        for r in mine:
            faults.update(r.faults)
        lines.append(
            f"| {workload} | {len(mine)} | {sum(r.operations['total'] for r in mine)} "
            f"| {sum(r.unknown for r in mine)} | {sum(faults.values())} "
            f"| {sum(len(r.violations) for r in mine)} "
            f"| {max(r.worst_overrun for r in mine):+.2f} s |"
        )
    every: Counter[str] = Counter()
    for r in runs:
        every.update(r.faults)
    lines += ["", "Faults by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(every.items()))]
    return "\n".join(lines)


def _seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds += list(range(int(first), int(last or first) + 1))
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="1-3", help="e.g. 1-30 or 4,7")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at once, each on a cluster of its own"
    )
    parser.add_argument("--write-docs", action="store_true", help="update docs/reliability.md")
    args = parser.parse_args(argv)
    plan = [(w, seed) for seed in _seeds(args.seeds) for w in args.workloads.split(",")]
    runs: list[Run] = []
    # Threads are enough: a run spends its time waiting on its processes.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run, workload, seed, args.duration) for workload, seed in plan]
        for future in as_completed(futures):
            result = future.result()
            runs.append(result)
            _report(result)
    runs.sort(key=lambda r: (r.seed, r.workload))
    summary = table(runs)
    print(summary)
    if args.write_docs:
        _write_docs(summary, args)
    return 1 if any(r.violations for r in runs) else 0


def _report(result: Run) -> None:
    print(
        f"seed {result.seed:3d} {result.workload:8s} ops {result.operations['total']:6d} "
        f"unknown {result.unknown:3d} faults {sum(result.faults.values()):3d} "
        f"violations {len(result.violations)} worst overrun {result.worst_overrun:+.2f}s",
        flush=True,
    )
    if result.violations:
        print(f"history kept in {result.history}")
        print("\n".join(["schedule:", *result.schedule, "violations:"]))
        print("\n".join(result.violations[:20]), flush=True)


def _write_docs(summary: str, args: argparse.Namespace) -> None:
    path = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
    text = path.read_text()
    start, end = text.index(DOCS_BEGIN), text.index(DOCS_END)
    block = (
        f"{DOCS_BEGIN}\n`make torture SEEDS={args.seeds} DURATION={args.duration:g} "
        f"JOBS={args.jobs}` (workloads: {args.workloads}):\n\n{summary}\n"
    )
    path.write_text(text[:start] + block + text[end:])


if __name__ == "__main__":
    sys.exit(main())
