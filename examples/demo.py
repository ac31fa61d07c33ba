"""The main job of ``make demo``: a work queue that survives a crashed worker,
then a scheduler that fails over.

Act 1: a producer enqueues 1,000 jobs. Four worker processes take them with
``claim``; each job increments a shared counter with ``transform``, and every
100 jobs a worker writes a report under a lock, with a fenced write. Midway,
a worker that has just claimed a job is killed with SIGKILL: its claim
expires with its lease, and another worker processes the job.

Act 2: three scheduler processes campaign in one election; the leader
records ticks with writes fenced by its leadership. The leader is paused
(SIGSTOP) past its TTL, then resumed: its next fenced write is rejected.
The next leader is killed (SIGKILL), and another takes over.

After each act a table checks the invariants; the exit status is non-zero if
any broke.

Uses a throwaway etcd from ``etcd_patterns.testing``, or ``$ETCD_ENDPOINTS``.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, NamedTuple

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from etcd_patterns import (
    EtcdPatterns,
    EtcdPatternsError,
    LeaderInfo,
    LeadershipLostError,
    OutcomeUnknownError,
    QueueEmptyError,
)
from etcd_patterns.testing import EtcdCluster

JOBS = 1000
WORKERS = 4
REPORT_EVERY = 100
CLAIM_TTL = 2  # seconds until a dead worker's job comes back
SCHEDULERS = 3
LEADER_TTL = 2  # seconds until a dead or paused leader is replaced
# etcd deletes expired leases in a sweep every 0.5 s; then a waiter wakes.
REPLACED_WITHIN = LEADER_TTL + 1.5
ACTING = "is acting"  # what a leader proclaims once it acts as one


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


def tick(token: int) -> Callable[[str], str]:
    """A fenced tick: ``"<token> <count>"``, with " BACK" once a token went back."""

    def write(value: str) -> str:
        words = value.split()
        previous, count = (int(words[0]), int(words[1])) if words else (0, 0)
        back = "BACK" in words or previous > token
        return f"{token} {count + 1}" + (" BACK" if back else "")

    return write


def scheduler(endpoints: str, namespace: str, name: str, out: str, stop: str) -> None:
    """Campaign; while leading, tick through writes fenced by the leadership.

    ``stop`` is a file whose existence says to stop: a process killed while
    waiting on a `multiprocessing.Event` would leave it unusable.
    """
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd, open(out, "a") as log:
        while not os.path.exists(stop):
            try:
                with etcd.elected("scheduler", name, ttl=LEADER_TTL, timeout=0.5) as leadership:
                    token = leadership.fencing_token
                    log.write(f"elected {token}\n")
                    log.flush()
                    leadership.proclaim(f"{name} {ACTING}")  # observers now know it acts
                    while not os.path.exists(stop):
                        try:
                            etcd.transform("ticks", tick(token), default="", guard=leadership)
                        except LeadershipLostError:
                            log.write(f"rejected {token}\n")
                            log.flush()
                            break
                        except OutcomeUnknownError:
                            continue  # a tick in flight while paused: try the next one
                        time.sleep(0.05)  # the scheduler's own work
            except EtcdPatternsError:
                # Not elected in time, or the leadership lost on leaving the
                # block: campaign again.
                continue


def next_leader(changes: Iterator[LeaderInfo | None], than: LeaderInfo | None) -> LeaderInfo:
    """The first acting leader after ``than`` that ``observe`` reports."""
    for leader in changes:
        if leader is None or not leader.value.endswith(ACTING):
            continue
        if than is None or leader.key != than.key:
            return leader
    raise AssertionError("observe ended")  # pragma: no cover - it never does


class Check(NamedTuple):
    """One row of an act's table."""

    invariant: str
    measured: str
    holds: bool


def render(title: str, checks: list[Check]) -> Table:
    table = Table(title=title)
    for column in ("invariant", "measured", "holds"):
        table.add_column(column)
    for check in checks:
        table.add_row(
            check.invariant, check.measured, "[green]yes[/]" if check.holds else "[red]NO[/]"
        )
    return table


class FailOver(NamedTuple):
    """What act 2 measured."""

    paused_token: int  # the fencing token of the leader that was paused
    after_pause: float  # seconds from its SIGSTOP to the next acting leader
    rejected: bool  # whether its next fenced write, once resumed, was rejected
    after_kill: float  # seconds from the next leader's SIGKILL to the one after


def _fail_over(
    console: Console,
    endpoints: str,
    namespace: str,
    processes: Mapping[str, multiprocessing.process.BaseProcess],
    logs: dict[str, str],
) -> FailOver:
    """Pause the acting leader, resume it, kill the next one; what it measured."""
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd:
        changes = etcd.observe("scheduler", timeout=60)
        first = next_leader(changes, None)
        first_name = first.value.split()[0]
        paused = processes[first_name]
        os.kill(paused.pid or 0, signal.SIGSTOP)
        stopped = time.monotonic()
        console.print(f"paused the leader, {first_name}, with SIGSTOP (ttl {LEADER_TTL}s)")
        second = next_leader(changes, first)
        second_name = second.value.split()[0]
        after_pause = time.monotonic() - stopped
        console.print(f"{second_name} leads {after_pause:.2f}s later")
        os.kill(paused.pid or 0, signal.SIGCONT)
        rejected = f"rejected {first.fencing_token}"
        until = time.monotonic() + 10
        while rejected not in Path(logs[first_name]).read_text() and time.monotonic() < until:
            time.sleep(0.1)  # the resumed leader's next tick, due at once
        was_rejected = rejected in Path(logs[first_name]).read_text()
        outcome = "was rejected" if was_rejected else "was NOT rejected"
        console.print(f"resumed {first_name}: its next fenced write {outcome}")
        os.kill(processes[second_name].pid or 0, signal.SIGKILL)
        shot = time.monotonic()
        third = next_leader(changes, second)
        after_kill = time.monotonic() - shot
        console.print(
            f"killed {second_name} with SIGKILL; {third.value.split()[0]} leads "
            f"{after_kill:.2f}s later"
        )
    return FailOver(first.fencing_token, after_pause, was_rejected, after_kill)


def election_act(console: Console, endpoints: str, namespace: str, workdir: Path) -> list[Check]:
    """Act 2: a paused leader, then a killed one; returns the invariants checked."""
    context = multiprocessing.get_context("spawn")
    stop = workdir / "stop-schedulers"
    logs = {f"scheduler{i}": str(workdir / f"scheduler{i}.log") for i in range(SCHEDULERS)}
    processes = {
        name: context.Process(target=scheduler, args=(endpoints, namespace, name, log, str(stop)))
        for name, log in logs.items()
    }
    try:
        for process in processes.values():
            process.start()
        console.print(f"started {SCHEDULERS} schedulers campaigning to lead 'scheduler'")
        measured = _fail_over(console, endpoints, namespace, processes, logs)
    finally:
        # Whatever happened: every scheduler resumed, told to stop, and gone.
        stop.touch()
        for process in processes.values():
            if process.pid is not None:
                os.kill(process.pid, signal.SIGCONT)
        for process in processes.values():
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd:
        ticks = etcd.get_values("ticks")[0]
    elected = sorted(
        int(line.split()[1])
        for log in logs.values()
        for line in Path(log).read_text().splitlines()
        if line.startswith("elected")
    )
    checks = [
        Check(
            f"a paused leader is replaced within ttl + 1.5s ({REPLACED_WITHIN:.1f}s)",
            f"{measured.after_pause:.2f}s",
            measured.after_pause <= REPLACED_WITHIN,
        ),
        Check(
            "the paused leader's later fenced write was rejected",
            f"token {measured.paused_token}: "
            + ("rejected" if measured.rejected else "not rejected"),
            measured.rejected,
        ),
        Check(
            f"a killed leader is replaced within ttl + 1.5s ({REPLACED_WITHIN:.1f}s)",
            f"{measured.after_kill:.2f}s",
            measured.after_kill <= REPLACED_WITHIN,
        ),
        Check(
            "one leader at a time: fencing tokens never went back",
            f"{len(elected)} terms, {len(set(elected))} tokens; {ticks.split()[1]} fenced ticks",
            "BACK" not in ticks and len(set(elected)) == len(elected),
        ),
    ]
    return checks


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
            Check(
                "every job processed exactly once (acked once)",
                f"{len(acked)} acks, {len(set(acked))} distinct",
                sorted(acked) == sorted(expected),
            ),
            Check("the counter is exact", f"{done} of {JOBS}", done == JOBS),
            Check(
                "no two report writers overlapped",
                f"{len(reports)} reports, {overlaps} overlaps",
                overlaps == 0 and len(reports) == JOBS // REPORT_EVERY,
            ),
            Check(
                "the killed worker's job was redelivered",
                f"{killed_job} acked {acked.count(killed_job)} time(s)",
                acked.count(killed_job) == 1,
            ),
            Check(
                "the queue is empty",
                f"{len(etcd.get_values('jobs'))} left",
                not etcd.get_values("jobs"),
            ),
        ]
        console.print(render(f"{JOBS} jobs, {WORKERS} workers, {elapsed:.1f}s", checks))
        console.print(f"last report: {etcd.get_values('report')[0]}")

        election = election_act(console, endpoints, namespace, workdir)
        title = f"{SCHEDULERS} schedulers, a paused leader and a killed one"
        console.print(render(title, election))
        return 0 if all(check.holds for check in checks + election) else 1


if __name__ == "__main__":
    raise SystemExit(main())
