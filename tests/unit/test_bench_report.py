"""The benchmark report renders from the committed results, and says what they say."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from benchmarks.report import find, median, targets, write_report

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (ROOT / "benchmarks" / "results" / "latest.json").read_text()
    )
    return loaded


def _render(data: dict[str, Any], tmp_path: Path) -> str:
    write_report(data, tmp_path / "benchmarks.md", tmp_path / "img")
    assert (tmp_path / "img" / "throughput-vs-contenders.png").stat().st_size > 0
    return (tmp_path / "benchmarks.md").read_text()


def _target_rows(text: str) -> dict[str, tuple[str, str]]:
    section = text.split("## Targets", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("Target", "---"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_the_targets_table_is_the_results(data: dict[str, Any], tmp_path: Path) -> None:
    rows = _target_rows(_render(data, tmp_path))
    results = data["results"]
    # Independently of targets(): a few rows read straight from the JSON.
    cycle = find(results, "lock cycle, uncontended")["rpcs_per_op"]
    assert rows["uncontended lock cycle: exactly 2 RPCs"] == (
        f"{cycle:.2f}",
        "yes" if round(cycle, 2) == 2.0 else "**no**",
    )
    eight = find(results, "lock, 8 processes (handoffs/s)")["rpcs_per_op"]
    assert rows["8 contenders: RPCs per acquisition <= 4"] == (
        f"{eight:.2f}",
        "yes" if round(eight, 2) <= 4 else "**no**",
    )
    enqueue = find(results, "enqueue")["rpcs_per_op"]
    assert rows["enqueue: 1 RPC"][0] == f"{enqueue:.2f}"
    # And every row is what targets() computed, none left out.
    baseline = median(find(results, "raw etcd3 guarded txn put")["ops_per_s"]) or 1.0
    computed = targets(results, baseline)
    assert rows == {
        target: (measured, "not measured" if met is None else "yes" if met else "**no**")
        for target, measured, met in computed
    }


def test_a_target_nothing_measured_says_so(data: dict[str, Any], tmp_path: Path) -> None:
    without = copy.deepcopy(data)
    without["results"] = [
        r for r in without["results"] if r["name"] != "transform, one conflict per call"
    ]
    rows = _target_rows(_render(without, tmp_path))
    assert rows["transform: exactly 1 extra RPC per conflict"] == ("not measured", "not measured")


def test_a_measured_conflict_is_judged(data: dict[str, Any], tmp_path: Path) -> None:
    measured = copy.deepcopy(data)
    uncontended = find(measured["results"], "transform, uncontended")["rpcs_per_op"]
    measured["results"].append(
        {
            "family": "kv",
            "name": "transform, one conflict per call",
            "ops_per_s": [100.0],
            "latencies_ms": [1.0],
            "rpcs_per_op": uncontended + 2.0,  # one extra, plus the meddling put
            "extra": {"meddling puts per call": 1},
        }
    )
    rows = _target_rows(_render(measured, tmp_path))
    assert rows["transform: exactly 1 extra RPC per conflict"] == ("1.00", "yes")
