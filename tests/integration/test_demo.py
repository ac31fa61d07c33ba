"""`make demo` keeps working: its invariants hold and it exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_demo_holds_its_invariants() -> None:
    result = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=110, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "NO" not in result.stdout
    assert "redelivered" in result.stdout
    assert "its next fenced write was rejected" in result.stdout  # act 2 ran
