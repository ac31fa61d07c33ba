"""``etcd-patterns``: the patterns from the shell, for scripts and operators.

    etcd-patterns get KEY [--json]
    etcd-patterns watch KEY [--json] [--timeout S]
    etcd-patterns members GROUP [--json]
    etcd-patterns transform KEY (--set VALUE | --incr N)
    etcd-patterns lock KEY [--ttl S] [--timeout S] -- CMD...
    etcd-patterns try-lock KEY [--ttl S] -- CMD...
    etcd-patterns enqueue DIR VALUE [--ttl S] [--priority P]
    etcd-patterns dequeue DIR [--timeout S]
    etcd-patterns claim DIR [--ttl S] [--timeout S] [--max-deliveries N]
                            [--dead-letter DIR] -- CMD...
    etcd-patterns stats DIR [--dead-letter DIR] [--json]
    etcd-patterns peek DIR [-n N] [--json]
    etcd-patterns semaphore NAME LIMIT [--ttl S] [--timeout S] -- CMD...
    etcd-patterns contenders NAME
    etcd-patterns elect NAME VALUE [--ttl S] [--timeout S] [-- CMD...]
    etcd-patterns leader NAME [--watch] [--timeout S]

Connection options come before the subcommand: ``--endpoints`` (default
``$ETCD_ENDPOINTS``, then ``127.0.0.1:2379``), ``--namespace``,
``--request-timeout``, ``--user`` with ``$ETCD_PASSWORD``, and ``--cacert``,
``--cert``, ``--key`` for TLS. An error is one line on stderr; ``--debug``
shows its traceback.

``elect`` prints its key once elected, then runs CMD while it leads, with
``ETCD_ELECTION_KEY`` and ``ETCD_ELECTION_REV`` set (as ``lock`` sets
``etcdctl lock``'s ``ETCD_LOCK_KEY`` and ``ETCD_LOCK_REV``), and resigns
when CMD exits. Without CMD, it leads until SIGINT or SIGTERM. SIGTERM is
passed on to CMD (a Ctrl-C at a terminal reaches CMD by itself), and the
leadership is resigned once CMD exits. If the leadership is lost, or etcd
stops confirming it (past the lease's TTL without an answer), CMD is sent
SIGTERM. ``leader`` prints the leader's value; with ``--watch``, one line
per change, an empty line while nobody leads.

``watch`` prints the key's values (as ``get`` reads them) now, then after
each change: one line per state, tab-separated, or a JSON list with
``--json``; it runs until interrupted, or exits 75 when ``--timeout`` passes
without a change. ``members`` prints one line per member of a group: its id
and its value, tab-separated.

``claim`` pipes the item's value to CMD's stdin, acks it if CMD succeeds,
and otherwise releases it, recording CMD's exit status as the item's last
error. ``stats`` prints one line per figure of `QueueStats`, tab-separated;
``peek`` one line per item: its key, "pending", "claimed" or "delayed", its
delivery count and its value.

``semaphore`` runs CMD holding a permit, with ``ETCD_SEMAPHORE_KEY`` and
``ETCD_SEMAPHORE_REV`` set. ``contenders`` prints, oldest first, one line
per key queued under a name: its create revision (the fencing token), its
lease in hex, its key and its value, separated by tabs.

``lock``, ``try-lock``, ``semaphore``, ``claim`` and ``elect`` pass SIGTERM
(and SIGINT, unless in the terminal's foreground) on to CMD, give it
``--grace`` seconds to exit before SIGKILL, and let go of what they hold
only once it has exited; CMD gets SIGTERM if the hold is lost or goes
unconfirmed, and, on Linux, if etcd-patterns itself dies.

Exit status: 0 on success; a command's own status for ``lock``,
``try-lock``, ``claim``, ``semaphore`` and ``elect`` (128 + N if it died of
signal N; 127 if it was not found, 126 if it could not be run); 75
(``EX_TEMPFAIL``) when a lock is held, a wait timed out, an election has no
leader, or a lock, permit, claim or leadership was lost or went unconfirmed
while CMD ran, so a script can try again later; 69 (``EX_UNAVAILABLE``)
when etcd cannot be reached; 130 on Ctrl-C while waiting; 2 for bad usage;
1 for any other error (``get`` finding nothing among them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from signal import SIGINT, SIGTERM
from types import FrameType

from . import __version__
from ._errors import (
    ClaimLostError,
    EtcdPatternsError,
    EtcdUnavailableError,
    LeadershipLostError,
    LockLostError,
    OutcomeUnknownError,
    QueueEmptyError,
)
from ._facade import DEFAULT_TIMEOUT, EtcdPatterns
from ._fence import Fence

__all__ = ["main"]

EX_TEMPFAIL = 75
EX_UNAVAILABLE = 69
# How long CMD has to exit once it is signalled, before SIGKILL (--grace).
GRACE = 10.0

_EPILOG = """\
exit status:
  0    success
  N    lock, try-lock, claim, semaphore, elect: CMD's own status (128+N if it died of signal N)
  1    any other error: a missing key for get, a value that is not an integer for --incr
  2    bad usage
  69   etcd cannot be reached (EX_UNAVAILABLE)
  75   try again later (EX_TEMPFAIL): a lock held, a wait timed out, no leader, or a lock,
       claim or leadership lost or unconfirmed while CMD ran (CMD was stopped)
  126  CMD cannot be run; 127: CMD not found
  130  Ctrl-C while waiting

environment:
  ETCD_ENDPOINTS      the endpoints, when --endpoints is not given (then 127.0.0.1:2379)
  ETCD_PASSWORD       the password of --user
  set for CMD:        ETCD_LOCK_KEY, ETCD_LOCK_REV (lock, try-lock, as etcdctl lock sets them);
                      ETCD_SEMAPHORE_KEY, ETCD_SEMAPHORE_REV; ETCD_ELECTION_KEY, ETCD_ELECTION_REV

signals: SIGTERM is passed on to CMD, and so is SIGINT unless etcd-patterns is in its
terminal's foreground (a Ctrl-C there reaches CMD by itself); signals ignored when
etcd-patterns started stay ignored. The lock, permit, claim or leadership is let go only
once CMD has exited (SIGKILL --grace seconds after a signal was passed on). If etcd-patterns
itself dies, CMD gets SIGTERM (Linux). Signals reach CMD's own process: a shell script
should exec its last command, or pass them on.
"""

# Runs CMD, on Linux, so that it gets SIGTERM if etcd-patterns dies: not
# even SIGKILL then leaves it running without what it holds.
_ORPHAN_GUARD = """\
import ctypes, os, signal, sys
parent, argv = int(sys.argv[1]), sys.argv[2:]
for name in ("SIGPIPE", "SIGXFSZ"):  # which Python ignores, and CMD must not inherit so
    signal.signal(getattr(signal, name), signal.SIG_DFL)
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != parent:
    sys.exit(128 + signal.SIGTERM)  # etcd-patterns is gone already
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    print(f"etcd-patterns: {argv[0]}: {exc.strerror}", file=sys.stderr)
    sys.exit(127 if isinstance(exc, FileNotFoundError) else 126)
"""


class _CommandFailed(Exception):
    """Raised inside a claim so that a failed command releases the item."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the command exited with status {status}")
        self.status = status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="etcd-patterns",
        description="Coordination patterns on etcd, from the shell.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--endpoints", help="host:port[,host:port...] (default: $ETCD_ENDPOINTS)")
    parser.add_argument("--namespace", default=None, help="a prefix for every key")
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for etcd on each request (default {DEFAULT_TIMEOUT})",
    )
    parser.add_argument("--user", help="etcd user; the password is read from $ETCD_PASSWORD")
    parser.add_argument("--cacert", help="CA certificate file; enables TLS")
    parser.add_argument("--cert", dest="tls_cert", help="client certificate file")
    parser.add_argument("--key", dest="tls_key", help="client key file")
    parser.add_argument(
        "--grace",
        type=_seconds,
        default=GRACE,
        help=f"seconds CMD has to exit once signalled, before SIGKILL (default {GRACE:g})",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    get = commands.add_parser(
        "get", help="print a key's value, or a directory's values; exit 1 if there is none"
    )
    get.add_argument("key")
    get.add_argument("--json", action="store_true", help="one JSON list of the values")

    watch = commands.add_parser("watch", help="print a key's values now, then after each change")
    watch.add_argument("key")
    watch.add_argument("--json", action="store_true", help="a JSON list per state")
    watch.add_argument("--timeout", type=float, help="seconds to wait per change (default: ever)")

    members = commands.add_parser("members", help="list a group's members and their values")
    members.add_argument("group")
    members.add_argument("--json", action="store_true", help="one JSON object")

    transform = commands.add_parser("transform", help="compare-and-swap set or increment")
    transform.add_argument("key")
    change = transform.add_mutually_exclusive_group(required=True)
    change.add_argument("--set", dest="value", help="the new value")
    change.add_argument("--incr", type=int, help="add N to an integer value (missing: 0)")

    _add_queue_commands(commands)
    _add_coordination_commands(commands)
    return parser


def _add_queue_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    enqueue = commands.add_parser("enqueue", help="append a value to a queue; prints its key")
    enqueue.add_argument("dir")
    enqueue.add_argument("value")
    enqueue.add_argument("--ttl", type=float, help="the item vanishes after TTL seconds")
    enqueue.add_argument(
        "--priority", type=int, default=0, help="-1000 to 1000; lower is served first (default 0)"
    )

    dequeue = commands.add_parser("dequeue", help="take the oldest value of a queue")
    dequeue.add_argument("dir")
    dequeue.add_argument("--timeout", type=float, help="seconds to wait (default: forever)")

    claim = commands.add_parser("claim", help="pipe the oldest item to CMD; ack if it succeeds")
    claim.add_argument("dir")
    claim.add_argument("--ttl", type=float, help="lease TTL of the claim in seconds")
    claim.add_argument("--timeout", type=float, help="seconds to wait (default: forever)")
    claim.add_argument(
        "--max-deliveries", type=int, help="move an item to the dead letters after N deliveries"
    )
    claim.add_argument("--dead-letter", help="the dead-letter queue (default: DIR.dead)")
    claim.usage = "etcd-patterns [options] claim DIR [options] -- CMD [ARGS...]"

    stats = commands.add_parser(
        "stats", help="how many items are pending, in flight, delayed and dead"
    )
    stats.add_argument("dir")
    stats.add_argument("--dead-letter", help="the dead-letter queue (default: DIR.dead)")
    stats.add_argument("--json", action="store_true", help="one JSON object")

    peek = commands.add_parser("peek", help="list the next items of a queue, taking none")
    peek.add_argument("dir")
    peek.add_argument("-n", type=int, default=10, help="how many (default 10)")
    peek.add_argument("--json", action="store_true", help="one JSON object per line")


def _add_coordination_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    for name, help_text in (("lock", "run CMD under the lock"), ("try-lock", "run CMD if free")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("key")
        sub.add_argument("--ttl", type=float, help="lease TTL in seconds")
        if name == "lock":
            sub.add_argument("--timeout", type=float, help="seconds to wait for the lock")
        sub.usage = f"etcd-patterns [options] {name} KEY [options] -- CMD [ARGS...]"

    semaphore = commands.add_parser("semaphore", help="run CMD holding one of LIMIT permits")
    semaphore.add_argument("name")
    semaphore.add_argument("limit", type=int, help="how many permits; every holder passes the same")
    semaphore.add_argument("--ttl", type=float, help="lease TTL in seconds")
    semaphore.add_argument("--timeout", type=float, help="seconds to wait for a permit")
    semaphore.usage = "etcd-patterns [options] semaphore NAME LIMIT [options] -- CMD [ARGS...]"

    contenders = commands.add_parser(
        "contenders", help="list who holds and who waits: a lock, semaphore or election"
    )
    contenders.add_argument("name")

    elect = commands.add_parser(
        "elect", help="campaign; print the key once elected, and run CMD while leading"
    )
    elect.add_argument("name")
    elect.add_argument("value", help="this candidate's proposal: the leader's value")
    elect.add_argument("--ttl", type=float, help="lease TTL in seconds")
    elect.add_argument("--timeout", type=float, help="seconds to wait (default: forever)")
    elect.usage = "etcd-patterns [options] elect NAME VALUE [options] [-- CMD [ARGS...]]"

    leader = commands.add_parser("leader", help="print the leader's value, or follow it")
    leader.add_argument("name")
    leader.add_argument(
        "--watch", action="store_true", help="print a line per change (empty: no leader)"
    )
    leader.add_argument("--timeout", type=float, help="with --watch: seconds to wait per change")


def _seconds(text: str) -> float:
    """A number of seconds for an option: finite and >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def _connect(args: argparse.Namespace) -> EtcdPatterns:
    return EtcdPatterns.connect(
        args.endpoints,
        timeout=args.request_timeout,
        namespace=args.namespace,
        ca_cert=args.cacert,
        cert_cert=args.tls_cert,
        cert_key=args.tls_key,
        user=args.user,
        password=os.environ.get("ETCD_PASSWORD") if args.user else None,
    )


def _get(etcd: EtcdPatterns, args: argparse.Namespace) -> int:
    values = etcd.get_values(args.key)
    if args.json:
        print(json.dumps(values))
    else:
        for value in values:
            print(value)
    if not values:
        print(f"etcd-patterns: no key or directory {args.key!r}", file=sys.stderr)
        return 1
    return 0


def _watch(etcd: EtcdPatterns, args: argparse.Namespace) -> int:
    for values in etcd.watch_values(args.key, timeout=args.timeout):
        print(json.dumps(values) if args.json else "\t".join(values), flush=True)
    return 0  # pragma: no cover - watch_values never ends by itself


def _members(etcd: EtcdPatterns, args: argparse.Namespace) -> int:
    found = etcd.members(args.group)
    if args.json:
        print(json.dumps(found, sort_keys=True))
    else:
        for member_id, value in sorted(found.items()):
            print(f"{member_id}\t{value}")
    return 0


def _transform(etcd: EtcdPatterns, args: argparse.Namespace) -> int:
    if args.value is not None:
        print(etcd.transform(args.key, lambda _: args.value, default=""))
    else:
        print(
            etcd.transform(args.key, lambda v: str(_integer(args.key, v) + args.incr), default="0")
        )
    return 0


class _NotAnInteger(EtcdPatternsError, ValueError):
    """``transform --incr`` found a value that is not an integer."""


def _integer(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise _NotAnInteger(f"the value of {key!r} is not an integer: {value!r}") from None


def _lock(etcd: EtcdPatterns, args: argparse.Namespace) -> int:
    holding = (
        etcd.locked(args.key, ttl=args.ttl, timeout=args.timeout)
        if args.command == "lock"
        else etcd.try_locked(args.key, ttl=args.ttl)
    )
    with holding as held:
        if held is None:
            print(f"etcd-patterns: lock {args.key!r} is held", file=sys.stderr)
            return EX_TEMPFAIL
        env = dict(os.environ)
        env["ETCD_LOCK_KEY"] = etcd.namespace + held.key  # as etcdctl lock sets them
        env["ETCD_LOCK_REV"] = str(held.fencing_token)
        return _run_holding(args.cmd, env, held, f"the lock {args.key!r}", grace=args.grace)


def _semaphore(etcd: EtcdPatterns, args: argparse.Namespace) -> int:
    with etcd.semaphore(args.name, args.limit, ttl=args.ttl, timeout=args.timeout) as permit:
        env = dict(os.environ)
        env["ETCD_SEMAPHORE_KEY"] = etcd.namespace + permit.key
        env["ETCD_SEMAPHORE_REV"] = str(permit.fencing_token)
        return _run_holding(args.cmd, env, permit, f"a permit of {args.name!r}", grace=args.grace)


def _contenders(etcd: EtcdPatterns, args: argparse.Namespace) -> int:
    for contender in etcd.contenders(args.name):
        lease = f"{contender.lease_id:x}" if contender.lease_id else "-"
        print(
            f"{contender.fencing_token}\t{lease}\t{etcd.namespace + contender.key}"
            f"\t{contender.value}"
        )
    return 0


def _enqueue(etcd: EtcdPatterns, args: argparse.Namespace) -> int:
    print(etcd.enqueue(args.dir, args.value, ttl=args.ttl, priority=args.priority))
    return 0


def _stats(etcd: EtcdPatterns, args: argparse.Namespace) -> int:
    stats = etcd.queue_stats(args.dir, dead_letter=args.dead_letter)
    if args.json:
        fields = asdict(stats)
        fields["pending"] = {str(p): n for p, n in stats.pending.items()}
        fields["total_pending"] = stats.total_pending
        print(json.dumps(fields, sort_keys=True))
        return 0
    by_priority = ", ".join(f"priority {p}: {n}" for p, n in stats.pending.items())
    age = "-" if stats.oldest_age is None else f"{stats.oldest_age:.1f} s"
    print(f"pending\t{stats.total_pending}" + (f"\t({by_priority})" if by_priority else ""))
    print(f"in flight\t{stats.in_flight}")
    print(f"delayed\t{stats.delayed}")
    print(f"oldest\t{age}")
    print(f"dead letters\t{stats.dead_letters}")
    return 0


def _peek(etcd: EtcdPatterns, args: argparse.Namespace) -> int:
    for item in etcd.peek(args.dir, args.n):
        if args.json:
            fields = asdict(item)
            fields["value_bytes"] = item.value_bytes.hex()
            print(json.dumps(fields, sort_keys=True))
            continue
        state = "claimed" if item.claimed else "delayed" if item.retry_at else "pending"
        value = item.value if item.value is not None else repr(item.value_bytes)
        print(f"{item.key}\t{state}\t{item.delivery_count}\t{value}")
    return 0


def _dequeue(etcd: EtcdPatterns, args: argparse.Namespace) -> int:
    print(etcd.dequeue(args.dir, timeout=args.timeout))
    return 0


def _claim(etcd: EtcdPatterns, args: argparse.Namespace) -> int:
    try:
        with etcd.claim(
            args.dir,
            ttl=args.ttl,
            timeout=args.timeout,
            max_deliveries=args.max_deliveries,
            dead_letter=args.dead_letter,
        ) as item:
            status = _run_holding(
                args.cmd,
                dict(os.environ),
                item,
                f"the claim on {item.key!r}",
                grace=args.grace,
                stdin=item.value_bytes,
            )
            if item.lost.is_set():
                raise ClaimLostError(
                    f"the claim on {item.key!r} was lost while the command ran; "
                    "the command was stopped"
                )
            if status:
                raise _CommandFailed(status)
    except _CommandFailed as failed:
        return failed.status
    return 0


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt."""


@contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """Turn SIGTERM into `_Terminated`, so that ``with`` blocks unwind."""

    def raise_terminated(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield  # started ignoring it: it stays ignored
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _status(returncode: int) -> int:
    """A child's exit status as a shell reports it: 128 + N for signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _elect(etcd: EtcdPatterns, args: argparse.Namespace) -> int:
    with (
        _terminate_as_exception(),
        etcd.elected(args.name, args.value, ttl=args.ttl, timeout=args.timeout) as leadership,
    ):
        key = etcd.namespace + leadership.key
        print(key, flush=True)
        if not args.cmd:
            try:
                leadership.lost.wait()
            except (KeyboardInterrupt, _Terminated):
                return 0  # asked to resign
            # Lost: leaving the block raises LeadershipLostError.
            return EX_TEMPFAIL
        env = dict(os.environ)
        env["ETCD_ELECTION_KEY"] = key
        env["ETCD_ELECTION_REV"] = str(leadership.fencing_token)
        return _run_holding(
            args.cmd, env, leadership, f"the leadership of {args.name!r}", grace=args.grace
        )


class _PassOn:
    """The SIGINT and SIGTERM handler while CMD runs.

    SIGTERM is passed on to CMD, even one that arrives while it is being
    started. So is SIGINT, unless etcd-patterns is in the foreground of its
    terminal: a Ctrl-C there reaches CMD's process group, which is this
    process's, by itself. A signal that etcd-patterns passes on starts
    CMD's grace period; one that CMD got by itself does not.
    """

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.pending: list[int] = []
        self.signalled_at: float | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and _in_the_foreground():
            return
        if self.child is None:
            self.pending.append(signum)
        else:
            self.send(signum)

    def send(self, signum: int) -> None:
        assert self.child is not None
        self.signalled_at = self.signalled_at or time.monotonic()
        if self.child.poll() is None:
            self.child.send_signal(signum)

    def adopt(self, child: subprocess.Popen[bytes]) -> None:
        self.child = child
        for signum in self.pending:
            self.send(signum)


def _in_the_foreground() -> bool:
    """Whether this process's group is its controlling terminal's foreground group."""
    try:
        terminal = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False  # no controlling terminal
    try:
        return os.tcgetpgrp(terminal) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(terminal)


def _spawn(cmd: list[str], env: dict[str, str], stdin: bytes | None) -> subprocess.Popen[bytes]:
    argv = cmd
    if sys.platform == "linux":
        # -I: nothing from the environment or the working directory runs
        # in the guard; -S: no site packages either.
        argv = [sys.executable, "-I", "-S", "-c", _ORPHAN_GUARD, str(os.getpid()), *cmd]
    child = subprocess.Popen(argv, env=env, stdin=None if stdin is None else subprocess.PIPE)
    if stdin is not None:
        pipe = child.stdin
        assert pipe is not None

        def feed() -> None:
            try:
                with contextlib.suppress(OSError):  # CMD may not read it all
                    pipe.write(stdin)
            finally:
                with contextlib.suppress(OSError):
                    pipe.close()

        threading.Thread(target=feed, daemon=True).start()
    return child


def _run_holding(
    cmd: list[str],
    env: dict[str, str],
    fence: Fence,
    what: str,
    *,
    grace: float,
    stdin: bytes | None = None,
) -> int:
    """Run ``cmd`` while ``fence`` holds; return its exit status once it has exited.

    CMD is sent SIGTERM once the hold is lost or no longer confirmed, and
    SIGKILL ``grace`` seconds after it was first signalled. So the caller
    lets go of the hold only after CMD is gone.
    """
    pass_on = _PassOn()
    # A signal that etcd-patterns was started ignoring stays ignored, for
    # CMD too, as a shell's background jobs expect.
    previous = [
        (signum, signal.signal(signum, pass_on))
        for signum in (SIGINT, SIGTERM)
        if signal.getsignal(signum) is not signal.SIG_IGN
    ]
    stopped: list[str] = []
    try:
        child = _spawn(cmd, env, stdin)
        pass_on.adopt(child)
        watchdog = threading.Thread(
            target=_stop_unless_held, args=(fence, pass_on, stopped), daemon=True
        )
        watchdog.start()
        while True:
            try:
                returncode = child.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                signalled = pass_on.signalled_at
                if signalled is not None and time.monotonic() > signalled + grace:
                    child.kill()
    finally:
        for signum, handler in previous:
            signal.signal(signum, handler)
    if stopped == ["in doubt"]:
        print(
            f"etcd-patterns: etcd did not confirm {what} in time; the command was stopped",
            file=sys.stderr,
        )
        return EX_TEMPFAIL
    # If the hold was lost, leaving its block raises the loss.
    return _status(returncode)


def _stop_unless_held(fence: Fence, pass_on: _PassOn, stopped: list[str]) -> None:
    """Send CMD SIGTERM once the hold is lost, or no longer confirmed.

    Past `Fence.confirmed_until`, etcd may have let the lease expire and
    given the hold to another: a holder cut off from etcd must stop acting.
    """
    child = pass_on.child
    assert child is not None
    while child.poll() is None:
        if fence.lost.is_set():
            stopped.append("lost")
        elif time.monotonic() > fence.confirmed_until:
            stopped.append("in doubt")
        else:
            left = fence.confirmed_until - time.monotonic()
            fence.lost.wait(timeout=max(0.0, min(0.5, left)))
            continue
        pass_on.send(signal.SIGTERM)
        return


def _leader(etcd: EtcdPatterns, args: argparse.Namespace) -> int:
    if not args.watch:
        info = etcd.leader(args.name)
        if info is None:
            print(f"etcd-patterns: election {args.name!r} has no leader", file=sys.stderr)
            return EX_TEMPFAIL
        print(info.value)
        return 0
    for info in etcd.observe(args.name, timeout=args.timeout):
        print("" if info is None else info.value, flush=True)
    return 0  # pragma: no cover - observe never ends by itself


_HANDLERS = {
    "get": _get,
    "watch": _watch,
    "members": _members,
    "transform": _transform,
    "lock": _lock,
    "try-lock": _lock,
    "enqueue": _enqueue,
    "dequeue": _dequeue,
    "claim": _claim,
    "stats": _stats,
    "peek": _peek,
    "semaphore": _semaphore,
    "contenders": _contenders,
    "elect": _elect,
    "leader": _leader,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    words = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is the command to run, untouched.
    split = words.index("--") if "--" in words else len(words)
    args = parser.parse_args(words[:split])
    args.cmd = words[split + 1 :]
    if args.command in ("lock", "try-lock", "claim", "semaphore") and not args.cmd:
        parser.error(f"{args.command} needs a command after --")
    try:
        with _connect(args) as etcd:
            return _HANDLERS[args.command](etcd, args)
    except KeyboardInterrupt:
        return 130
    except _Terminated:
        return 128 + signal.SIGTERM
    except (EtcdPatternsError, ValueError, TypeError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"etcd-patterns: {exc}", file=sys.stderr)
        lost = (LeadershipLostError, LockLostError, ClaimLostError)
        if isinstance(exc, (TimeoutError, QueueEmptyError, *lost)):
            return EX_TEMPFAIL
        return EX_UNAVAILABLE if isinstance(exc, (EtcdUnavailableError, OutcomeUnknownError)) else 1


if __name__ == "__main__":
    sys.exit(main())
