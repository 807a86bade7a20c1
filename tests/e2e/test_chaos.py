"""The short chaos profile (run by ``make test`` and CI): a few seeded runs of tests/tools/chaos.py, each
ending with every invariant checked. ``make chaos`` runs the long profile (>= 200 runs) and writes
RELIABILITY.md."""

from __future__ import annotations

import warnings

import pytest

import chaos

# Two operator processes a run, seconds of chaos each: `make stories` (run by `make e2e`), not `make test`.
pytestmark = pytest.mark.slow

#: Fixed seeds, so CI replays the same schedules; a failing seed replays with `make chaos SEED=<seed> RUNS=1`.
SEEDS = (1, 2, 3)


@pytest.mark.xdist_group("operator-processes")
@pytest.mark.parametrize("seed", SEEDS)
async def test_a_run_of_faults_kills_and_host_failures_ends_with_every_invariant_holding(seed: int) -> None:
    args = chaos.parse_args(["--runs", "1", "--seed", str(seed), "--chaos-seconds", "4"])
    result = await chaos.run_one(seed, args)
    unexplained = [v for v in result.violations if chaos.known_open(v) is None]
    if result.violations and not unexplained:
        # Open bugs with an entry in RELIABILITY.md: visible in the test report, not a CI failure.
        warnings.warn(f"known open chaos failure: {chaos.describe(result)}", stacklevel=1)
    assert result.error is None and not unexplained, chaos.describe(result)
