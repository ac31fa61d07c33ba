"""The etcd-patterns command line, run as a separate process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from etcd_patterns import EtcdPatterns
from etcd_patterns.testing import EtcdCluster, ExternalEtcd
from tests.helpers import Raw

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
    assert cli(etcd, namespace, "get", "missing").stdout == ""


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


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["lock", "L"], 2),  # no command
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
