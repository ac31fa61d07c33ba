"""The etcd-patterns command line, run as a separate process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from etcd_patterns import EtcdPatterns, __version__
from etcd_patterns.testing import EtcdCluster, ExternalEtcd, FaultProxy
from tests.helpers import Raw, wait_until, watchers

Etcd = EtcdCluster | ExternalEtcd


def cli(
    etcd: Etcd, namespace: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "etcd_patterns",
            f"--endpoints={','.join(etcd.endpoints)}",
            f"--namespace={namespace}",
            *args,
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_get_and_transform(etcd: Etcd, namespace: str, raw: Raw) -> None:
    assert cli(etcd, namespace, "transform", "n", "--incr", "5").stdout == "5\n"
    assert cli(etcd, namespace, "transform", "n", "--incr", "2").stdout == "7\n"
    assert cli(etcd, namespace, "transform", "d/a", "--set", "x").stdout == "x\n"
    raw.put("d/b", "y")
    assert cli(etcd, namespace, "get", "n").stdout == "7\n"
    assert cli(etcd, namespace, "get", "d").stdout == "x\ny\n"
    missing = cli(etcd, namespace, "get", "missing")
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == "etcd-patterns: no key or directory 'missing'\n"
    raw.put("lines", "a\nb")  # ambiguous as lines; not as JSON
    assert json.loads(cli(etcd, namespace, "get", "lines", "--json").stdout) == ["a\nb"]
    assert json.loads(cli(etcd, namespace, "get", "d", "--json").stdout) == ["x", "y"]
    assert cli(etcd, namespace, "get", "missing", "--json").stdout == "[]\n"


def test_incr_on_a_value_that_is_not_an_integer_says_so_and_changes_nothing(
    etcd: Etcd, namespace: str, raw: Raw
) -> None:
    raw.put("n", "seven")
    before = raw.snapshot()
    result = cli(etcd, namespace, "transform", "n", "--incr", "1")
    assert result.returncode == 1
    assert result.stderr == "etcd-patterns: the value of 'n' is not an integer: 'seven'\n"
    assert raw.snapshot() == before


def test_version_and_help_name_the_exit_codes_and_variables() -> None:
    script = Path(sys.executable).with_name("etcd-patterns")
    version = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (version.returncode, version.stdout) == (0, f"etcd-patterns {__version__}\n")
    shown = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert shown.returncode == 0
    for text in ("69", "75", "130", "ETCD_LOCK_KEY", "ETCD_ENDPOINTS", "ETCD_PASSWORD", "SIGTERM"):
        assert text in shown.stdout, text


def test_lock_runs_the_command_with_etcdctls_variables(etcd: Etcd, namespace: str) -> None:
    script = "import os; print(os.environ['ETCD_LOCK_KEY'], os.environ['ETCD_LOCK_REV'])"
    result = cli(
        etcd, namespace, "lock", "L", "--timeout", "10", "--", sys.executable, "-c", script
    )
    assert result.returncode == 0, result.stderr
    key, revision = result.stdout.split()
    assert key.startswith(namespace + "L/")
    assert int(revision) > 0
    failing = cli(etcd, namespace, "lock", "L", "--", sys.executable, "-c", "raise SystemExit(3)")
    assert failing.returncode == 3  # the command's own status


def test_try_lock_exits_75_while_held(etcd: Etcd, namespace: str, patterns: EtcdPatterns) -> None:
    with patterns.locked("L"):
        result = cli(etcd, namespace, "try-lock", "L", "--", "echo", "ran")
        assert result.returncode == 75
        assert result.stdout == ""
        timed_out = cli(etcd, namespace, "lock", "L", "--timeout", "0.2", "--", "echo", "ran")
        assert timed_out.returncode == 75
    assert cli(etcd, namespace, "try-lock", "L", "--", "echo", "ran").stdout == "ran\n"


def test_enqueue_and_dequeue(etcd: Etcd, namespace: str) -> None:
    key = cli(etcd, namespace, "enqueue", "q", "job-1").stdout.strip()
    assert key.startswith("q/")
    assert cli(etcd, namespace, "dequeue", "q", "--timeout", "5").stdout == "job-1\n"
    empty = cli(etcd, namespace, "dequeue", "q", "--timeout", "0")
    assert empty.returncode == 75
    assert "empty" in empty.stderr


def test_claim_acks_on_success_and_releases_on_failure(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns
) -> None:
    patterns.enqueue("q", "payload")
    cat_and_fail = "import sys; print(sys.stdin.read()); raise SystemExit(4)"
    failed = cli(etcd, namespace, "claim", "q", "--", sys.executable, "-c", cat_and_fail)
    assert failed.returncode == 4
    assert failed.stdout == "payload\n"
    assert patterns.get_values("q") == ["payload"]  # released, still queued
    done = cli(etcd, namespace, "claim", "q", "--timeout", "5", "--", "cat")
    assert done.returncode == 0
    assert done.stdout == "payload"
    assert patterns.get_values("q") == []


def test_priorities_stats_and_peek(etcd: Etcd, namespace: str, patterns: EtcdPatterns) -> None:
    cli(etcd, namespace, "enqueue", "q", "later")
    urgent = cli(etcd, namespace, "enqueue", "q", "urgent", "--priority", "-5").stdout.strip()
    assert cli(etcd, namespace, "peek", "q", "-n", "1").stdout == f"{urgent}\tpending\t0\turgent\n"
    shown = [
        json.loads(line) for line in cli(etcd, namespace, "peek", "q", "--json").stdout.splitlines()
    ]
    assert [(item["value"], item["priority"]) for item in shown] == [("urgent", -5), ("later", 0)]
    stats = json.loads(cli(etcd, namespace, "stats", "q", "--json").stdout)
    assert (stats["pending"], stats["total_pending"], stats["in_flight"]) == (
        {"-5": 1, "0": 1},
        2,
        0,
    )
    assert (stats["delayed"], stats["dead_letters"]) == (0, 0)
    text = cli(etcd, namespace, "stats", "q").stdout
    assert "pending\t2\t(priority -5: 1, priority 0: 1)\n" in text
    assert "dead letters\t0\n" in text
    assert patterns.dequeue("q", timeout=0) == "urgent"


def test_a_claim_whose_command_fails_too_often_is_a_dead_letter(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns
) -> None:
    patterns.enqueue("q", "payload")
    fail = [sys.executable, "-c", "raise SystemExit(3)"]
    failed = cli(etcd, namespace, "claim", "q", "--max-deliveries", "1", "--", *fail)
    assert failed.returncode == 3
    assert patterns.get_values("q") == []
    (dead,) = patterns.peek("q.dead")
    assert (dead.value, dead.delivery_count) == ("payload", 1)
    assert dead.last_error == "_CommandFailed: the command exited with status 3"


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["lock", "L"], 2),  # no command
        (["semaphore", "S", "2"], 2),  # no command
        (["semaphore", "S", "two", "--", "true"], 2),  # a limit that is not a number
        (["transform", "n"], 2),  # neither --set nor --incr
        (["get", ""], 1),  # an empty key
    ],
)
def test_usage_errors(etcd: Etcd, namespace: str, args: list[str], status: int) -> None:
    result = cli(etcd, namespace, *args)
    assert result.returncode == status
    assert result.stderr


def test_unreachable_etcd_exits_69() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "etcd_patterns",
            "--endpoints=127.0.0.1:1",
            "--request-timeout=1",
            "get",
            "k",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 69
    assert "127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1  # one line


def test_debug_shows_the_traceback(etcd: Etcd, namespace: str) -> None:
    result = cli(etcd, namespace, "--debug", "get", "")
    assert result.returncode == 1
    assert "Traceback" in result.stderr


# A command run under `lock`, `try-lock` or `claim` that reports, from etcd
# itself, the lease TTL and create revision of the key it was given.
INSPECT = """
import os, sys
import etcd3
host, port = sys.argv[1].rsplit(":", 1)
client = etcd3.client(host=host, port=int(port))
key = os.environ.get("ETCD_LOCK_KEY") or next(
    meta.key.decode() for _, meta in client.get_prefix(sys.argv[2])
)
_, meta = client.get(key)
print(client.get_lease_info(meta.lease_id).grantedTTL, meta.create_revision,
      os.environ.get("ETCD_LOCK_REV", "-"))
"""


@pytest.mark.parametrize("command", ["lock", "try-lock"])
def test_a_locks_ttl_and_etcd_lock_rev_are_etcds(etcd: Etcd, namespace: str, command: str) -> None:
    result = cli(
        etcd,
        namespace,
        *(command, "L", "--ttl", "7", "--"),
        *(sys.executable, "-c", INSPECT, etcd.endpoints[0], "-"),
    )
    assert result.returncode == 0, result.stderr
    ttl, create_revision, lock_rev = result.stdout.split()
    assert ttl == "7"
    assert lock_rev == create_revision  # ETCD_LOCK_REV is the key's create revision


def test_a_claims_ttl_is_etcds(etcd: Etcd, namespace: str, patterns: EtcdPatterns) -> None:
    patterns.enqueue("q", "job")
    claims = namespace + ".etcd-patterns/claims/"
    result = cli(
        etcd,
        namespace,
        *("claim", "q", "--ttl", "7", "--timeout", "5", "--"),
        *(sys.executable, "-c", INSPECT, etcd.endpoints[0], claims),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "7"


@pytest.mark.timeout(60)
def test_an_enqueued_items_ttl(etcd: Etcd, namespace: str, raw: Raw) -> None:
    key = cli(etcd, namespace, "enqueue", "q", "short-lived", "--ttl", "7").stdout.strip()
    (_, meta), *_ = raw.client.get_prefix(raw.key("q/"))
    assert raw.client.get_lease_info(meta.lease_id).grantedTTL == 7
    assert key == meta.key.decode()[len(namespace) :]


def test_a_claim_on_an_empty_queue_exits_75(etcd: Etcd, namespace: str) -> None:
    result = cli(etcd, namespace, "claim", "q", "--timeout", "0", "--", "echo", "ran")
    assert result.returncode == 75
    assert result.stdout == ""


@pytest.mark.timeout(60)
def test_ctrl_c_exits_130(etcd: Etcd, namespace: str) -> None:
    # The child restores the default SIGINT handling, which a parent running
    # in the background may have left ignored.
    before = watchers(etcd)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from etcd_patterns.cli import main; sys.exit(main(sys.argv[1:]))",
            f"--endpoints={','.join(etcd.endpoints)}",
            f"--namespace={namespace}",
            *("dequeue", "q", "--timeout", "30"),
        ],
    )
    wait_until(lambda: watchers(etcd) > before)  # the consumer waits on its watch
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=30) == 130


def test_the_installed_console_script(etcd: Etcd, namespace: str, raw: Raw) -> None:
    script = Path(sys.executable).with_name("etcd-patterns")
    assert script.exists()
    raw.put("k", "v")
    result = subprocess.run(
        [
            *(str(script), f"--endpoints={','.join(etcd.endpoints)}"),
            *(f"--namespace={namespace}", "get", "k"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "v\n"


# -- elect and leader -------------------------------------------------------------


def cli_process(
    etcd: Etcd, namespace: str, *args: str, console: bool = False
) -> subprocess.Popen[str]:
    """The command line as a running process whose stdin, stdout and stderr the test holds.

    With ``console``, the installed console script; otherwise the module.
    Either way with Ctrl-C's default action, which a parent in the
    background may have left ignored (and an ignored signal stays ignored).
    """
    start = (
        [
            sys.executable,
            "-c",
            "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
            "os.execv(sys.argv[1], sys.argv[1:])",
            str(Path(sys.executable).with_name("etcd-patterns")),
        ]
        if console
        else [
            sys.executable,
            "-c",
            "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from etcd_patterns.cli import main; sys.exit(main(sys.argv[1:]))",
        ]
    )
    return subprocess.Popen(
        [*start, f"--endpoints={','.join(etcd.endpoints)}", f"--namespace={namespace}", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# A command that says when it runs, and says "stopped" and exits 0 on SIGTERM.
STOPS_ON_SIGTERM = (
    "import signal, sys, threading\n"
    "def stop(*_):\n"
    "    print('stopped', flush=True); sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "print('running', flush=True)\n"
    "threading.Event().wait(60)\n"
)

# A command that says when it runs and when it is asked to stop, and then
# exits 7 once its stdin (which it shares with the CLI) gives it a line.
STOPS_WHEN_TOLD = (
    "import signal, sys, threading\n"
    "def stop(*_):\n"
    "    print('stopping', flush=True); sys.stdin.readline(); sys.exit(7)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "signal.signal(signal.SIGINT, stop)\n"
    "print('running', flush=True)\n"
    "threading.Event().wait(60)\n"
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_reaches_the_command_and_the_lock_is_held_until_it_exits(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw, signum: int
) -> None:
    child = cli_process(
        etcd, namespace, "lock", "L", "--", sys.executable, "-c", STOPS_WHEN_TOLD, console=True
    )
    assert child.stdout is not None
    assert child.stdin is not None
    with child:  # killed and reaped, whatever happens
        try:
            assert child.stdout.readline() == "running\n"
            child.send_signal(signum)  # from outside a terminal: passed on
            assert child.stdout.readline() == "stopping\n"
            # The command still runs: the lock is still held.
            assert raw.count("L/") == 1
            assert not patterns.try_lock("L", lambda: None).acquired
            child.stdin.write("go\n")
            child.stdin.flush()
        finally:
            if child.poll() is None and sys.exc_info()[0] is not None:
                child.kill()
        _, err = child.communicate(timeout=30)
    assert child.returncode == 7, err  # the command's own status
    assert raw.count("L/") == 0  # released once it exited


@pytest.mark.timeout(60)
def test_a_command_that_ignores_sigterm_is_killed_after_the_grace_period(
    etcd: Etcd, namespace: str, raw: Raw
) -> None:
    script = (
        "import signal, threading\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('running', flush=True)\n"
        "threading.Event().wait(60)\n"
    )
    grace = 0.5
    child = cli_process(
        etcd, namespace, f"--grace={grace}", "lock", "L", "--", sys.executable, "-c", script
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "running\n"
    child.send_signal(signal.SIGTERM)
    asked = time.monotonic()
    _, err = child.communicate(timeout=30)
    assert child.returncode == 128 + signal.SIGKILL, err
    assert time.monotonic() - asked >= grace
    assert raw.count("L/") == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["lock", "claim"])
def test_a_killed_cli_stops_its_command(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, command: str
) -> None:
    script = "import sys; sys.stdin.close()\n" + STOPS_ON_SIGTERM
    where = ["L"] if command == "lock" else ["q"]
    if command == "claim":
        patterns.enqueue("q", "job")
    child = cli_process(etcd, namespace, command, *where, "--", sys.executable, "-c", script)
    assert child.stdout is not None
    assert child.stdout.readline() == "running\n"
    child.kill()  # SIGKILL: nothing of the CLI runs after it
    child.wait(timeout=30)
    # The command, which shares the CLI's stdout, hears of it at once (the
    # kernel may deliver the parent-death signal more than once).
    assert child.stdout.readline().startswith("stopped")
    child.communicate(timeout=30)  # and exits: the pipe it shares ends


@pytest.mark.timeout(60)
def test_a_lock_lost_while_the_command_runs_stops_it_and_exits_75(
    etcd: Etcd, namespace: str, raw: Raw
) -> None:
    script = STOPS_ON_SIGTERM
    child = cli_process(
        etcd, namespace, "lock", "L", "--ttl", "3", "--", sys.executable, "-c", script
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "running\n"
    (key,) = [key for key in raw.snapshot() if b"/L/" in key]
    _, meta = raw.client.get(key)
    raw.client.revoke_lease(meta.lease_id)  # the lock is lost
    out, err = child.communicate(timeout=30)
    assert child.returncode == 75, err
    assert out == "stopped\n"
    assert "lost" in err


def test_a_command_that_cannot_be_found_exits_127(etcd: Etcd, namespace: str) -> None:
    result = cli(etcd, namespace, "lock", "L", "--", "no-such-command-here")
    assert result.returncode == 127
    assert "no-such-command-here" in result.stderr


def test_elect_runs_the_command_while_leading(etcd: Etcd, namespace: str, raw: Raw) -> None:
    script = "import os; print(os.environ['ETCD_ELECTION_KEY'], os.environ['ETCD_ELECTION_REV'])"
    result = cli(etcd, namespace, "elect", "E", "me", "--", sys.executable, "-c", script)
    assert result.returncode == 0, result.stderr
    printed_key, command_output = result.stdout.splitlines()
    key, revision = command_output.split()
    assert key == printed_key
    assert key.startswith(namespace + "E/")
    assert int(revision) > 0
    assert raw.count("E/") == 0  # resigned
    failing = cli(etcd, namespace, "elect", "E", "me", "--", sys.executable, "-c", "exit(3)")
    assert failing.returncode == 3  # the command's own status


def test_leader_prints_the_value_or_exits_75(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns
) -> None:
    none = cli(etcd, namespace, "leader", "E")
    assert (none.returncode, none.stdout) == (75, "")
    assert "no leader" in none.stderr
    with patterns.elected("E", "host-1"):
        assert cli(etcd, namespace, "leader", "E").stdout == "host-1\n"


@pytest.mark.timeout(60)
def test_elect_without_a_command_leads_until_sigterm(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    child = cli_process(etcd, namespace, "elect", "E", "me")
    assert child.stdout is not None
    key = child.stdout.readline().strip()  # printed once elected
    info = patterns.leader("E")
    assert info is not None
    assert (namespace + info.key, info.value) == (key, "me")
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert raw.count("E/") == 0  # resigned


@pytest.mark.timeout(60)
def test_elect_passes_sigterm_on_and_resigns_when_the_command_exits(
    etcd: Etcd, namespace: str, raw: Raw
) -> None:
    script = (
        "import signal, sys, threading\n"
        "def stop(*_):\n"
        "    print('stopping', flush=True); sys.exit(7)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('running', flush=True)\n"
        "threading.Event().wait(60)\n"
    )
    child = cli_process(etcd, namespace, "elect", "E", "me", "--", sys.executable, "-c", script)
    assert child.stdout is not None
    child.stdout.readline()  # the key
    assert child.stdout.readline().strip() == "running"
    assert raw.count("E/") == 1
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=30)
    assert (child.returncode, out.strip()) == (7, "stopping"), err
    assert raw.count("E/") == 0


@pytest.mark.timeout(60)
def test_elect_stops_the_command_when_the_leadership_is_lost(
    etcd: Etcd, namespace: str, raw: Raw
) -> None:
    script = STOPS_ON_SIGTERM
    child = cli_process(
        etcd, namespace, "elect", "E", "me", "--ttl", "3", "--", sys.executable, "-c", script
    )
    assert child.stdout is not None
    key = child.stdout.readline().strip()
    assert child.stdout.readline().strip() == "running"
    _, meta = raw.client.get(key)
    raw.client.revoke_lease(meta.lease_id)  # the leadership is lost
    out, err = child.communicate(timeout=30)
    assert child.returncode == 75, err
    assert out.strip() == "stopped"
    assert "no longer leads" in err


@pytest.mark.timeout(60)
def test_leader_watch_prints_each_change(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns
) -> None:
    child = cli_process(etcd, namespace, "leader", "E", "--watch")
    assert child.stdout is not None
    assert child.stdout.readline() == "\n"  # nobody leads
    with patterns.elected("E", "first") as leadership:
        assert child.stdout.readline() == "first\n"
        leadership.proclaim("second")
        assert child.stdout.readline() == "second\n"
    assert child.stdout.readline() == "\n"
    child.send_signal(signal.SIGINT)
    child.communicate(timeout=30)
    assert child.returncode == 130


@pytest.mark.timeout(60)
def test_sigterm_while_campaigning_exits_143_and_leaves_no_key(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    with patterns.elected("E", "leader"):
        before = watchers(etcd)
        child = cli_process(etcd, namespace, "elect", "E", "waiting", "--", "true")
        wait_until(lambda: watchers(etcd) > before)  # it waits behind the leader
        assert raw.count("E/") == 2
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=30)
        assert (child.returncode, out) == (128 + signal.SIGTERM, ""), err
        assert raw.count("E/") == 1  # only the leader's


@pytest.mark.chaos  # a fault proxy: never on an etcd that panics on dropped connections
@pytest.mark.timeout(60)
def test_elect_stops_the_command_once_etcd_stops_confirming_the_leadership(
    etcd: Etcd, namespace: str
) -> None:
    ttl = 2
    host, port = etcd.endpoints[0].rsplit(":", 1)
    script = STOPS_ON_SIGTERM
    with FaultProxy((host, int(port))) as proxy:
        child = subprocess.Popen(
            [
                *(sys.executable, "-m", "etcd_patterns", f"--endpoints={proxy.endpoint}"),
                *(f"--namespace={namespace}", "--request-timeout=1"),
                *("elect", "E", "me", "--ttl", str(ttl), "--", sys.executable, "-c", script),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        child.stdout.readline()  # the key: elected
        assert child.stdout.readline().strip() == "running"
        proxy.blackhole()  # the leader is cut off from etcd
        cut = time.monotonic()
        out, err = child.communicate(timeout=30)
        assert proxy.stats["bytes held"] > 0  # the fault fired
    print(f"command stopped, CLI exited {time.monotonic() - cut:.1f}s after the cut (ttl={ttl}s)")
    assert child.returncode == 75, err
    assert out.strip() == "stopped"
    assert "did not confirm the leadership" in err


def test_semaphore_runs_the_command_holding_a_permit(etcd: Etcd, namespace: str, raw: Raw) -> None:
    script = "import os; print(os.environ['ETCD_SEMAPHORE_KEY'], os.environ['ETCD_SEMAPHORE_REV'])"
    result = cli(etcd, namespace, "semaphore", "S", "2", "--", sys.executable, "-c", script)
    assert result.returncode == 0, result.stderr
    key, revision = result.stdout.split()
    assert key.startswith(namespace + "S/")
    assert int(revision) > 0
    assert raw.count("S/") == 0
    mismatched = cli(etcd, namespace, "semaphore", "S", "0", "--", "true")
    assert mismatched.returncode == 1
    assert "limit must be >= 1" in mismatched.stderr


def test_contenders_lists_holders_and_waiters(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns
) -> None:
    assert cli(etcd, namespace, "contenders", "L").stdout == ""
    with patterns.locked("L") as held:
        (line,) = cli(etcd, namespace, "contenders", "L").stdout.splitlines()
        revision, lease, key, value = line.split("\t")
        assert (int(revision), int(lease, 16), key) == (
            held.fencing_token,
            held.lease_id,
            namespace + held.key,
        )
        assert "pid=" in value


def test_watch_prints_each_state_and_members_lists_the_group(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns
) -> None:
    patterns.transform("cfg/a", lambda _: "1", default="")
    watched = cli(etcd, namespace, "watch", "cfg", "--json", "--timeout", "0.3")
    assert watched.returncode == 75  # no change within the timeout
    assert watched.stdout == '["1"]\n'
    with patterns.member("workers", "w1", "10.0.0.1"):
        assert cli(etcd, namespace, "members", "workers").stdout == "w1\t10.0.0.1\n"
        listed = cli(etcd, namespace, "members", "workers", "--json").stdout
        assert json.loads(listed) == {"w1": "10.0.0.1"}


@pytest.mark.timeout(60)
def test_a_claim_lost_while_the_command_runs_stops_it_and_exits_75(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns, raw: Raw
) -> None:
    patterns.enqueue("q", "job")
    script = (
        "import sys, threading\n"
        "sys.stdin.read()\n"
        "print('running', flush=True)\n"
        "threading.Event().wait(60)\n"  # SIGTERM's default action ends it
    )
    child = cli_process(etcd, namespace, "claim", "q", "--", sys.executable, "-c", script)
    assert child.stdout is not None
    assert child.stdout.readline() == "running\n"
    (claim,) = [key for key in raw.snapshot() if b"/claims/" in key]
    _, meta = raw.client.get(claim)
    raw.client.revoke_lease(meta.lease_id)  # the claim is lost
    _, err = child.communicate(timeout=30)
    assert child.returncode == 75, err
    assert "was lost while the command ran" in err


def test_a_claims_value_reaches_the_command_as_its_bytes_whatever_the_locale(
    etcd: Etcd, namespace: str, patterns: EtcdPatterns
) -> None:
    patterns.enqueue("q", "héllo")
    script = "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"
    environment = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}
    result = subprocess.run(
        [
            *(sys.executable, "-m", "etcd_patterns", f"--endpoints={','.join(etcd.endpoints)}"),
            *(f"--namespace={namespace}", "claim", "q", "--timeout", "10"),
            *("--", sys.executable, "-c", script),
        ],
        capture_output=True,
        timeout=60,
        check=False,
        env=environment,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "héllo".encode()


def test_a_signal_the_cli_was_started_ignoring_stays_ignored_for_the_command(
    etcd: Etcd, namespace: str
) -> None:
    script = "import signal; print(signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)"
    cli_args = [
        *(sys.executable, "-m", "etcd_patterns", f"--endpoints={','.join(etcd.endpoints)}"),
        *(f"--namespace={namespace}", "lock", "L", "--", sys.executable, "-c", script),
    ]
    result = subprocess.run(
        ["sh", "-c", 'trap "" TERM; exec "$@"', "sh", *cli_args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "True\n"), result.stderr


def test_nothing_in_the_working_directory_runs_in_the_commands_guard(
    etcd: Etcd, namespace: str, tmp_path: Path
) -> None:
    (tmp_path / "signal.py").write_text("raise SystemExit('imported from the working directory')")
    result = subprocess.run(
        [
            *(str(Path(sys.executable).with_name("etcd-patterns")),),
            *(f"--endpoints={','.join(etcd.endpoints)}", f"--namespace={namespace}"),
            *("lock", "L", "--", "echo", "ran"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert (result.returncode, result.stdout) == (0, "ran\n"), result.stderr


@pytest.mark.parametrize("grace", ["-1", "nan", "inf", "soon"])
def test_a_grace_that_is_not_a_finite_number_of_seconds_is_bad_usage(grace: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "etcd_patterns", f"--grace={grace}", "lock", "L", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--grace" in result.stderr


def test_the_command_does_not_inherit_the_signals_python_ignores(
    etcd: Etcd, namespace: str
) -> None:
    # Python ignores SIGPIPE and SIGXFSZ; a command in a pipeline must die of
    # SIGPIPE as usual, not see EPIPE errors.
    result = cli(etcd, namespace, "lock", "L", "--", "cat", "/proc/self/status")
    assert result.returncode == 0, result.stderr
    (ignored,) = [
        line.split()[1] for line in result.stdout.splitlines() if line.startswith("SigIgn")
    ]
    mask = int(ignored, 16)
    assert not mask & (1 << (signal.SIGPIPE - 1)), ignored
    assert not mask & (1 << (signal.SIGXFSZ - 1)), ignored
