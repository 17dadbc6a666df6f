"""Notebook 10's knob: the number of rollout actors against environment steps per second, redrawn from runs."""
from __future__ import annotations

import numpy as np
import pytest

from distlab.rl import actor_learner as rl
from distlab.viz import rl as rlviz


@pytest.fixture(scope="module")
def runs() -> dict:
    """Real (short) runs with 1 and 2 actors; the knob needs only their learner records."""
    return {f"{n} actors": rl.train_local(actors=n, seed=0, max_steps=600, max_seconds=20) for n in (1, 2)}


def test_the_slider_marks_the_chosen_runs_rate_and_draws_its_returns(runs: dict) -> None:
    knob = rlviz.actors_knob(runs)
    slider, fig = knob.children
    assert list(slider.options) == [1, 2]
    assert list(fig.data[0].x) == [1, 2]
    for n in (2, 1):
        slider.value = n
        result = runs[f"{n} actors"]
        assert list(fig.data[1].x) == [n]
        assert fig.data[1].y[0] == pytest.approx(result["env_steps"] / result["seconds"], rel=1e-12)
        returns = np.array(result["episodes"]["ret"])
        assert len(fig.data[2].y) == len(returns)
        assert fig.data[2].y[-1] == pytest.approx(returns[-20:].mean(), rel=1e-12)
        assert list(fig.data[2].x) == result["episodes"]["t"]
        assert f"with {n} actor" in fig.layout.annotations[1].text


def test_the_knob_keeps_one_run_per_number_of_actors(runs: dict) -> None:
    later = {**runs, "1 actor again": runs["2 actors"] | {"actors": 1}}
    slider, fig = rlviz.actors_knob(later).children
    assert list(slider.options) == [1, 2]
    slider.value = 1
    again = later["1 actor again"]
    assert fig.data[1].y[0] == pytest.approx(again["env_steps"] / again["seconds"], rel=1e-12)
