"""The short nemesis campaign: every workload under fixed seeds, judged by its checkers.

`make torture` runs the long one (tests/nemesis/campaign.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from etcd_patterns.testing import external_from_environment
from tests.nemesis.campaign import run
from tests.nemesis.workloads import WORKLOADS

SEEDS = (1, 2)
DURATION = 8.0

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.skipif(
        external_from_environment() is not None, reason="faults need a cluster of its own"
    ),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", SEEDS)
def test_the_nemesis_finds_no_violation(seed: int) -> None:
    # Two runs at a time, each on a cluster of its own: a run spends its
    # DURATION striking and recording, whatever share of the CPU it gets.
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda workload: run(workload, seed, DURATION), sorted(WORKLOADS)))
    problems: list[str] = []
    for result in results:
        print(
            f"{result.workload} seed {seed}: {result.operations['total']} operations, "
            f"{result.unknown} unknown, faults {dict(result.faults)}, "
            f"worst timeout overrun {result.worst_overrun:+.2f}s"
        )
        if not sum(result.faults.values()):
            problems.append(f"{result.workload}: the nemesis did not strike")
        if not result.operations["ok"]:
            problems.append(f"{result.workload}: the clients got no work done")
        counts = {name: n for verdict in result.verdicts for name, n in verdict.counts.items()}
        if result.workload == "claims" and not counts["dead letters"]:
            problems.append("claims: no item was given back often enough to be a dead letter")
        if result.workload == "counter" and not counts["states yielded"]:
            problems.append("counter: the watchers saw no state")
        if result.workload == "partition" and not (
            counts["revisions every member reported"] and counts["rosters yielded"]
        ):
            problems.append("partition: no revision's shares were all seen, or no roster")
        if result.violations:
            problems += [
                f"{result.workload} seed {seed}; history in {result.history}",
                *result.schedule,
                *result.violations[:20],
            ]
    assert problems == [], "\n".join(problems)
