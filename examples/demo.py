"""The main job of ``make demo``: a work queue that survives a crashed worker.

A producer enqueues 1,000 jobs. Four worker processes take them with
``claim``; each job increments a shared counter with ``transform``, and every
100 jobs a worker writes a report under a lock, with a fenced write. Midway,
a worker that has just claimed a job is killed with SIGKILL: its claim
expires with its lease, and another worker processes the job. At the end a
table checks the invariants; the exit status is non-zero if any broke.

Uses a throwaway etcd from ``etcd_patterns.testing``, or ``$ETCD_ENDPOINTS``.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from etcd_patterns import EtcdPatterns, QueueEmptyError
from etcd_patterns.testing import EtcdCluster

JOBS = 1000
WORKERS = 4
REPORT_EVERY = 100
CLAIM_TTL = 2  # seconds until a dead worker's job comes back


def incr(value: str) -> str:
    return str(int(value) + 1)


def summary(count: int, name: str) -> Callable[[str], str]:
    return lambda _: f"{count} jobs, by {name}"


def worker(endpoints: str, namespace: str, name: str, out: str, stop: Any) -> None:
    """Claim jobs until the queue stays empty and the producer is done."""
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd, open(out, "a") as log:
        while True:
            try:
                with etcd.claim("jobs", ttl=CLAIM_TTL, timeout=0.5) as job:
                    count = int(etcd.transform("done", incr, default="0"))
                    log.write(f"acked {job.value}\n")
                    log.flush()
            except QueueEmptyError:
                if stop.is_set():
                    return
                continue
            if count % REPORT_EVERY == 0:
                with etcd.locked("report-lock", timeout=30) as held:
                    began = time.monotonic_ns()
                    etcd.transform("report", summary(count, name), default="", guard=held)
                    log.write(f"report {began} {time.monotonic_ns()}\n")
                    log.flush()


def victim(endpoints: str, namespace: str, claimed: Any, out: str) -> None:
    """Claim one job, say so, and hang there until killed."""
    etcd = EtcdPatterns.connect(endpoints, namespace=namespace)
    job = etcd.claim("jobs", ttl=CLAIM_TTL, timeout=30).__enter__()
    Path(out).write_text(job.value)
    claimed.set()
    threading.Event().wait()


def main() -> int:
    console = Console()
    context = multiprocessing.get_context("spawn")
    with ExitStack() as stack:
        endpoints = os.environ.get("ETCD_ENDPOINTS")
        if not endpoints:
            cluster = stack.enter_context(EtcdCluster(size=1))
            endpoints = ",".join(cluster.endpoints)
            console.print(f"started a throwaway etcd at [bold]{endpoints}[/]")
        workdir = Path(stack.enter_context(TemporaryDirectory()))
        namespace = f"/demo/{os.getpid()}-{int(time.time())}/"
        etcd = stack.enter_context(EtcdPatterns.connect(endpoints, namespace=namespace))
        started = time.monotonic()

        etcd.enqueue_many("jobs", [f"job-{i:04}" for i in range(JOBS)])
        console.print(f"enqueued {JOBS} jobs; starting {WORKERS} workers")
        stop = context.Event()
        logs = [str(workdir / f"worker{i}.log") for i in range(WORKERS)]
        workers = [
            context.Process(target=worker, args=(endpoints, namespace, f"worker{i}", log, stop))
            for i, log in enumerate(logs)
        ]
        for process in workers:
            process.start()

        claimed, victim_out = context.Event(), str(workdir / "victim.txt")
        doomed = None
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("jobs done", total=JOBS)
            while (done := int((etcd.get_values("done") or ["0"])[0])) < JOBS:
                progress.update(task, completed=done)
                if doomed is None and done >= JOBS // 3:
                    doomed = context.Process(
                        target=victim, args=(endpoints, namespace, claimed, victim_out)
                    )
                    doomed.start()
                    claimed.wait(timeout=30)
                    os.kill(doomed.pid or 0, signal.SIGKILL)
                    doomed.join()
                    progress.console.print(
                        f"killed a worker holding [bold]{Path(victim_out).read_text()}[/]"
                        f" with SIGKILL; its claim expires in {CLAIM_TTL}s"
                    )
                time.sleep(0.1)  # the display refreshes ten times a second
            progress.update(task, completed=done)
        stop.set()
        for process in workers:
            process.join(timeout=30)
        elapsed = time.monotonic() - started

        lines = [line.split() for log in logs for line in Path(log).read_text().splitlines()]
        acked = [words[1] for words in lines if words[0] == "acked"]
        reports = sorted((int(w[1]), int(w[2])) for w in lines if w[0] == "report")
        overlaps = sum(1 for a, b in itertools.pairwise(reports) if b[0] < a[1])
        killed_job = Path(victim_out).read_text() if Path(victim_out).exists() else "(none)"
        expected = {f"job-{i:04}" for i in range(JOBS)}
        checks = [
            (
                "every job processed exactly once (acked once)",
                f"{len(acked)} acks, {len(set(acked))} distinct",
                sorted(acked) == sorted(expected),
            ),
            ("the counter is exact", f"{done} of {JOBS}", done == JOBS),
            (
                "no two report writers overlapped",
                f"{len(reports)} reports, {overlaps} overlaps",
                overlaps == 0 and len(reports) == JOBS // REPORT_EVERY,
            ),
            (
                "the killed worker's job was redelivered",
                f"{killed_job} acked {acked.count(killed_job)} time(s)",
                acked.count(killed_job) == 1,
            ),
            (
                "the queue is empty",
                f"{len(etcd.get_values('jobs'))} left",
                not etcd.get_values("jobs"),
            ),
        ]
        table = Table(title=f"{JOBS} jobs, {WORKERS} workers, {elapsed:.1f}s")
        for column in ("invariant", "measured", "holds"):
            table.add_column(column)
        for name, measured, ok in checks:
            table.add_row(name, measured, "[green]yes[/]" if ok else "[red]NO[/]")
        console.print(table)
        console.print(f"last report: {etcd.get_values('report')[0]}")
        return 0 if all(ok for _, _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
