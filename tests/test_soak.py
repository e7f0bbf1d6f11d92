"""The chaos soak's quick variant (issue #15; the full one is ``python bench/soak.py``):
1,500 runs of a two-step job drained by four workers while one is SIGKILLed every
0.5-1 s, beside the same drain without kills. Nothing is lost, no step's effect is written
twice, the pool is not starved by restart back-offs, and throughput holds up."""

from __future__ import annotations

import pytest

from bench import soak

pytestmark = [pytest.mark.fault, pytest.mark.slow]


@pytest.mark.timeout(180)
def test_chaos_soak_loses_nothing_and_does_nothing_twice(dsn, empty_dsn):
    """With kills: every task succeeded, every effect once, no back-off (the workers had
    done work before they died), and at least half the throughput of the calm run."""
    calm = soak.run(empty_dsn, 1500, 4, kill=False)
    chaos = soak.run(dsn, 1500, 4, kill=True)
    print(f"\n{calm.line('without kills')}\n{chaos.line('with kills')}")
    assert (calm.lost, calm.duplicated) == (0, 0)
    assert chaos.kills >= 2
    assert (chaos.lost, chaos.duplicated) == (0, 0)
    assert sum(chaos.back_offs) < 2.0, (
        chaos.back_offs
    )  # a worker killed before its first task backs off
    assert chaos.rate >= 0.5 * calm.rate
