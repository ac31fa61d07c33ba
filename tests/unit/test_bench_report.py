"""The benchmark report renders from the committed results."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.report import write_report

ROOT = Path(__file__).resolve().parents[2]


def test_the_report_renders(tmp_path: Path) -> None:
    data = json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())
    write_report(data, tmp_path / "benchmarks.md", tmp_path / "img")
    text = (tmp_path / "benchmarks.md").read_text()
    assert "## Targets" in text
    assert (tmp_path / "img" / "throughput-vs-contenders.png").stat().st_size > 0
