"""The main job of ``make demo``: real work through real failures, then a scheduler that fails over.

Act 1: 1,000 jobs go through four worker processes on a 3-member etcd
cluster. Each worker claims a job (``claim``), works on it for a few
milliseconds, counts it (``transform`` on a shared counter, fenced by the
claim) and acks it; every 100 jobs it writes a report under a lock, with a
write fenced by the lock. While they run:

* the etcd leader is SIGKILLed once: the cluster elects another, and the
  workers carry on;
* then one worker, chosen at random, is SIGKILLed in the middle of a job's
  work: its claim expires with its lease, and another worker does the job.

The table shows what was measured: every job acked exactly once, the killed
job's redelivery time, the counter against the increments acknowledged, no
overlapping fenced sections, how long the cluster took to fail over, and the
longest stall any worker saw.

Act 2: three scheduler processes campaign in one election; the leader
records ticks with writes fenced by its leadership. The leader is paused
(SIGSTOP) past its TTL, then resumed: its next fenced write is rejected.
The next leader is killed (SIGKILL), and another takes over.

The exit status is non-zero if any invariant broke. Worker processes start
with ``spawn``: each makes its own instance (docs/processes.md says why not
fork).

Uses a throwaway 3-member cluster from ``etcd_patterns.testing``, or
``$ETCD_ENDPOINTS`` (then no etcd member is killed).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import signal
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
WORK = (0.005, 0.015)  # seconds of work per job
GIVE_UP = 120.0  # seconds: act 1 ends then, done or not, and its table says so
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
    """Claim jobs until the queue stays empty and the producer is done.

    Logs, each line ending with its CLOCK_MONOTONIC time (one clock for
    every process): ``start JOB`` when its work begins, ``counted JOB`` once
    the counter's increment is acknowledged (``unknown JOB`` if its outcome
    is not known), ``acked JOB`` once the ack is (``unsettled JOB`` if the
    ack raised), ``report BEGAN`` for a fenced report.
    """
    chance = random.Random(name)
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd, open(out, "a") as log:

        def say(*words: object) -> None:
            log.write(" ".join(map(str, (*words, time.monotonic()))) + "\n")
            log.flush()

        while True:
            acking = None  # the job whose ack is under way
            try:
                with etcd.claim("jobs", ttl=CLAIM_TTL, timeout=0.5) as job:
                    say("start", job.value)
                    time.sleep(chance.uniform(*WORK))  # the job's own work
                    try:
                        count = int(etcd.transform("done", incr, default="0", guard=job))
                    except OutcomeUnknownError:
                        say("unknown", job.value)  # the increment may have landed
                        raise
                    say("counted", job.value)
                    acking = job.value  # leaving the block acks it
                say("acked", job.value)
                if count % REPORT_EVERY == 0:
                    with etcd.locked("report-lock", timeout=30) as held:
                        began = time.monotonic()
                        etcd.transform("report", summary(count, name), default="", guard=held)
                        say("report", began)
            except QueueEmptyError:
                if stop.is_set():
                    return
            except EtcdPatternsError:
                # etcd failing over: the claim decides who does the job. An
                # ack in doubt may have been made: the job is not redone then.
                if acking is not None:
                    say("unsettled", acking)


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
    holds: bool | None  # None: a measurement shown, not a promise checked


def render(title: str, checks: list[Check]) -> Table:
    table = Table(title=title)
    for column in ("invariant", "measured", "holds"):
        table.add_column(column)
    for check in checks:
        shown = {True: "[green]yes[/]", False: "[red]NO[/]", None: "-"}[check.holds]
        table.add_row(check.invariant, check.measured, shown)
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
    # spawn: each worker starts afresh and makes its own instance (see
    # docs/processes.md for why not fork).
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


class Faults(NamedTuple):
    """What act 1 struck, and when (CLOCK_MONOTONIC)."""

    killed_worker: str
    killed_job: str
    killed_at: float
    failover: float | None  # seconds from the leader's SIGKILL to the next write, if killed


def _kill_a_worker_mid_job(
    workers: Mapping[str, multiprocessing.process.BaseProcess], logs: dict[str, str]
) -> tuple[str, str, float]:
    """SIGKILL a worker chosen at random in the middle of a job's work.

    The worker is frozen (SIGSTOP) once its log says it started a job; if
    its log still says so once it is frozen, it is killed there, and
    otherwise let go on (SIGCONT) until its next job.
    """
    name = random.choice(sorted(workers))
    pid = workers[name].pid or 0
    path = Path(logs[name])
    until = time.monotonic() + 30
    while time.monotonic() < until:
        lines = path.read_text().splitlines()
        if lines and lines[-1].split()[0] == "start":
            os.kill(pid, signal.SIGSTOP)
            _wait_stopped(pid)
            frozen = path.read_text().splitlines()
            if frozen[-1] == lines[-1]:  # still in that job's work
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
                workers[name].join()
                return name, lines[-1].split()[1], killed_at
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.001)  # polling the log: the worker's next line is milliseconds away
    raise RuntimeError(f"{name} never started a job")


def _wait_stopped(pid: int) -> None:
    """Return once the process is stopped: a write it had begun is then in its log."""
    stat = Path(f"/proc/{pid}/stat")
    until = time.monotonic() + 5
    while time.monotonic() < until:
        # The state is the field after the parenthesised command name.
        if stat.read_text().rpartition(")")[2].split()[0] in ("T", "t"):
            return
        time.sleep(0.001)  # polling the kernel's view of the process
    raise RuntimeError(f"process {pid} did not stop")


def _kill_the_leader(cluster: EtcdCluster, etcd: EtcdPatterns) -> float:
    """SIGKILL the etcd leader; seconds until a write goes through again."""
    cluster.leader().kill()
    killed = time.monotonic()
    while True:
        try:
            etcd.transform("probe", incr, default="0", timeout=5)
            return time.monotonic() - killed
        except EtcdPatternsError:
            continue  # etcd elects a new leader: the next attempt waits for it


def main() -> int:
    console = Console()
    # spawn: each worker starts afresh and makes its own instance (see
    # docs/processes.md for why not fork).
    context = multiprocessing.get_context("spawn")
    with ExitStack() as stack:
        endpoints = os.environ.get("ETCD_ENDPOINTS")
        cluster = None
        if not endpoints:
            cluster = stack.enter_context(EtcdCluster(size=3))
            endpoints = ",".join(cluster.endpoints)
            console.print(f"started a throwaway 3-member etcd cluster at [bold]{endpoints}[/]")
        workdir = Path(stack.enter_context(TemporaryDirectory()))
        namespace = f"/demo/{os.getpid()}-{int(time.time())}/"
        etcd = stack.enter_context(EtcdPatterns.connect(endpoints, namespace=namespace))
        started = time.monotonic()

        etcd.enqueue_many("jobs", [f"job-{i:04}" for i in range(JOBS)])
        console.print(f"enqueued {JOBS} jobs; starting {WORKERS} workers")
        stop = context.Event()
        logs = {f"worker{i}": str(workdir / f"worker{i}.log") for i in range(WORKERS)}
        workers = {
            name: context.Process(target=worker, args=(endpoints, namespace, name, log, stop))
            for name, log in logs.items()
        }
        for process in workers.values():
            process.start()

        killed: tuple[str, str, float] | None = None
        failover: float | None = None
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("jobs counted", total=JOBS)
            while (done := int((etcd.get_values("done") or ["0"])[0])) < JOBS or _left(etcd):
                progress.update(task, completed=done)
                if time.monotonic() > started + GIVE_UP:
                    progress.console.print(f"[red]not done after {GIVE_UP:.0f}s[/]")
                    break
                # The leader first: a new leader renews every lease, which
                # would stretch the killed worker's claim.
                if cluster is not None and failover is None and done >= JOBS // 4:
                    failover = _kill_the_leader(cluster, etcd)
                    progress.console.print(
                        "killed the etcd leader with SIGKILL; writes went through again "
                        f"{failover:.2f}s later"
                    )
                if killed is None and done >= JOBS // 2:
                    killed = _kill_a_worker_mid_job(workers, logs)
                    progress.console.print(
                        f"killed {killed[0]} with SIGKILL in the middle of [bold]{killed[1]}[/];"
                        f" its claim expires in {CLAIM_TTL}s"
                    )
                time.sleep(0.1)  # the display refreshes ten times a second
            progress.update(task, completed=done)
        stop.set()
        for process in workers.values():
            process.join(timeout=30)
        elapsed = time.monotonic() - started
        assert killed is not None
        checks = _act_one_checks(etcd, logs, Faults(*killed, failover), done)
        console.print(render(f"{JOBS} jobs, {WORKERS} workers, {elapsed:.1f}s", checks))
        console.print(f"last report: {etcd.get_values('report')[0]}")

        if cluster is not None:
            for node in cluster.nodes:
                if not node.running:
                    node.restart()  # the killed member rejoins for act 2
        election = election_act(console, endpoints, namespace, workdir)
        title = f"{SCHEDULERS} schedulers, a paused leader and a killed one"
        console.print(render(title, election))
        return 0 if all(check.holds is not False for check in checks + election) else 1


def _left(etcd: EtcdPatterns) -> bool:
    """Whether any job is still queued or claimed."""
    stats = etcd.queue_stats("jobs")
    return bool(stats.pending or stats.in_flight or stats.delayed)


def _act_one_checks(
    etcd: EtcdPatterns, logs: dict[str, str], faults: Faults, done: int
) -> list[Check]:
    """Act 1's invariants, from the workers' logs and etcd."""
    lines = {
        name: [line.split() for line in Path(log).read_text().splitlines()]
        for name, log in logs.items()
    }
    every = [words for mine in lines.values() for words in mine]
    acked = [words[1] for words in every if words[0] == "acked"]
    unsettled = {words[1] for words in every if words[0] == "unsettled"} - set(acked)
    counted = sum(words[0] == "counted" for words in every)
    unknown = sum(words[0] == "unknown" for words in every)
    # The killed worker's increment may have landed just before it died.
    victim = lines[faults.killed_worker]
    in_doubt = unknown + int(bool(victim) and victim[-1][0] == "start")
    reports = sorted((float(w[1]), float(w[2])) for w in every if w[0] == "report")
    overlaps = sum(1 for a, b in itertools.pairwise(reports) if b[0] < a[1])
    redone = [
        float(w[2])
        for name, mine in lines.items()
        if name != faults.killed_worker
        for w in mine
        if w[0] == "acked" and w[1] == faults.killed_job and float(w[2]) > faults.killed_at
    ]
    redelivery = (redone[0] - faults.killed_at) if redone else float("inf")
    stalls = [
        b - a
        for name, mine in lines.items()
        if name != faults.killed_worker
        for a, b in itertools.pairwise(float(w[-1]) for w in mine if w[0] == "acked")
    ]
    expected = {f"job-{i:04}" for i in range(JOBS)}
    checks = [
        Check(
            "every job acked exactly once",
            f"{len(acked)} acks, {len(set(acked))} distinct"
            + (f", {len(unsettled)} more acks in doubt" if unsettled else ""),
            len(acked) == len(set(acked)) and set(acked) | unsettled == expected,
        ),
        Check(
            f"the killed worker's job, {faults.killed_job}, was redone by another within "
            f"its claim's ttl + 1.5s ({CLAIM_TTL + 1.5:.1f}s)",
            f"acked {redelivery:.2f}s after the kill",
            redelivery <= CLAIM_TTL + 1.5,
        ),
        Check(
            "the counter holds every acknowledged increment, once",
            f"{done} = {counted} acknowledged + {done - counted} of {in_doubt} in doubt",
            counted <= done <= counted + in_doubt,
        ),
        Check(
            "no two fenced report sections overlapped",
            f"{len(reports)} reports, {overlaps} overlaps",
            overlaps == 0 and len(reports) >= JOBS // REPORT_EVERY,
        ),
    ]
    if faults.failover is not None:
        checks.append(
            Check(
                "how long the cluster took to fail over after its leader was killed",
                f"writes again {faults.failover:.2f}s after the SIGKILL",
                None,
            )
        )
    checks += [
        Check(
            "the longest stall a surviving worker saw between two acks",
            f"{max(stalls, default=0.0):.2f}s",
            None,
        ),
        Check(
            "the queue is empty",
            f"{len(etcd.get_values('jobs'))} left",
            not etcd.get_values("jobs"),
        ),
    ]
    return checks


if __name__ == "__main__":
    raise SystemExit(main())
