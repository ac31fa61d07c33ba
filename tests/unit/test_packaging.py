"""The wheel carries the typing marker, the plugin and the entry point."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_the_wheel(tmp_path: Path) -> None:
    subprocess.run(
        # The backend comes from the test dependencies: no network needed.
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"),
            *("-q", "-w", str(tmp_path), str(ROOT)),
        ],
        check=True,
        capture_output=True,
        timeout=280,
    )
    (wheel,) = tmp_path.glob("etcd_patterns-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "etcd_patterns/py.typed" in names
        assert "etcd_patterns/pytest_plugin.py" in names
        (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
        text = archive.read(entry_points).decode()
    assert "etcd_patterns = etcd_patterns.pytest_plugin" in text
