"""The short nemesis campaign: every workload under fixed seeds, judged by its checkers.

`make torture` runs the long one (tests/nemesis/campaign.py).
"""

from __future__ import annotations

import pytest

from etcd_patterns.testing import external_from_environment
from tests.nemesis.campaign import run
from tests.nemesis.workloads import WORKLOADS

SEEDS = (1, 2)
DURATION = 10.0

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.skipif(
        external_from_environment() is not None, reason="faults need a cluster of its own"
    ),
]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_the_nemesis_finds_no_violation(workload: str, seed: int) -> None:
    result = run(workload, seed, DURATION)
    print(
        f"{workload} seed {seed}: {result.operations['total']} operations, "
        f"{result.unknown} unknown, faults {dict(result.faults)}, "
        f"worst timeout overrun {result.worst_overrun:+.2f}s"
    )
    assert sum(result.faults.values()) > 0  # the nemesis did strike
    assert result.operations["ok"] > 0  # and the clients got work done
    assert result.violations == [], "\n".join(
        [f"seed {seed}; history in {result.history}", *result.schedule, *result.violations[:20]]
    )
