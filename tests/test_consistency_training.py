"""BSP / SSP / ASP as one staleness bound s: measured staleness never exceeds s, BSP's is 0, ASP's is unbounded."""

import math
from types import SimpleNamespace

import pytest

import distlab as dl
from distlab.architectures import staleness as consistency

STRAGGLER = {"slow_rank": 3, "delay": 0.03}  # worker 3 sleeps 30 ms per step; workers 1 and 2 do not


def train(staleness, steps=24):
    return dl.launch(consistency.train, world_size=4, timeout=60, staleness=staleness, steps=steps, **STRAGGLER)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("s", [0, 1, 3])
def test_measured_staleness_never_exceeds_the_bound_and_reaches_it_with_a_straggler(s):
    results = train(s).results
    measured = consistency.measured_staleness(results)
    assert len(measured) >= 24 * 3 and max(measured) == s  # fast workers run ahead as far as allowed, no further
    for worker in (r for r in results if r["role"] == "worker"):
        assert max(worker["steps"]["clock_staleness"]) <= s  # what each read was told, too
    if s == 0:
        (server,) = [r for r in results if r["role"] == "server"]
        # BSP: every gradient meets the version it was computed on
        assert set(server["updates"]["version_staleness"]) == {0}


@pytest.mark.timeout(60)
def test_asp_lets_the_fast_workers_run_arbitrarily_far_ahead():
    results = train(math.inf).results
    assert max(consistency.measured_staleness(results)) > 3
    steps = {r["rank"]: len(r["steps"]["step"]) for r in results if r["role"] == "worker"}
    assert steps[3] < (steps[1] + steps[2]) / 2


def test_the_bound_names_the_model():
    assert [consistency.label(s) for s in (0, 2, math.inf)] == ["BSP (s=0)", "SSP (s=2)", "ASP (s=inf)"]


@pytest.mark.parametrize("bad", [-1, 1.5, "bsp", None])
def test_a_bound_that_is_not_a_clock_count_is_refused(bad):
    with pytest.raises(ValueError, match="staleness must be an integer >= 0 or math.inf"):
        consistency.train(SimpleNamespace(rank=0, world_size=4, backend="gloo"), staleness=bad)


@pytest.mark.timeout(60)
def test_jitter_one_makes_every_worker_sleep_every_step():
    results = dl.launch(consistency.train, world_size=4, timeout=60, staleness=math.inf, steps=8, jitter=1.0,
                        delay=0.02).results
    for worker in (r for r in results if r["role"] == "worker"):
        steps = len(worker["steps"]["step"])
        assert steps >= 1 and worker["wall_s"] >= steps * 0.02  # a sleep in each of its steps
