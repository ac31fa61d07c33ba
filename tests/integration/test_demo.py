"""`make demo` keeps working: its invariants hold and it exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_demo_holds_its_invariants() -> None:
    # Its own cluster: the demo kills a member.
    environment = {k: v for k, v in os.environ.items() if k != "ETCD_ENDPOINTS"}
    result = subprocess.run(
        [sys.executable, str(DEMO)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
        env=environment,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "NO" not in result.stdout
    # Both faults of act 1 struck, and the checks ran.
    assert "killed the etcd leader with SIGKILL" in result.stdout
    assert "in the middle of job-" in result.stdout
    assert "every job acked exactly once" in result.stdout
    assert "its next fenced write was rejected" in result.stdout  # act 2 ran
