"""Notebook 07's knob: the staleness bound s against wall time and loss, redrawn from real runs."""
from __future__ import annotations

import math

import pytest

import distlab as dl
from distlab.architectures import staleness
from distlab.viz import consistency as viz
from distlab.viz.architectures import in_time_order


@pytest.fixture(scope="module")
def runs() -> dict:
    """BSP and ASP with a straggler on a server and two workers: two short real runs."""
    return {s: dl.launch(staleness.train, world_size=3, timeout=120, quiet=True, staleness=s, steps=20,
                         slow_rank=1, delay=0.01).results for s in (0, math.inf)}


def test_the_slider_marks_the_chosen_bound_and_draws_its_loss(runs: dict) -> None:
    slider, fig = viz.staleness_knob(runs).children
    assert [label for label, _ in slider.options] == ["0", "∞"]
    for s, label in ((math.inf, "∞"), (0, "0")):
        slider.value = s
        assert list(fig.data[1].x) == [label]
        assert fig.data[1].y[0] == pytest.approx(staleness.wall_time(runs[s]), rel=1e-12)
        steps = in_time_order(runs[s])
        assert fig.data[3].y[0] == pytest.approx(steps["loss"].tail(10 * 2).mean(), rel=1e-12)  # 2 workers
        assert list(fig.data[4].x) == list(steps["t"])
        assert fig.data[4].y[0] == pytest.approx(steps["loss"].iloc[0], rel=1e-12)
        assert label in fig.layout.annotations[2].text


def test_the_lines_hold_every_bound_in_order(runs: dict) -> None:
    fig = viz.staleness_knob(runs).children[1]
    assert list(fig.data[0].x) == ["0", "∞"]
    assert list(fig.data[0].y) == pytest.approx([staleness.wall_time(runs[s]) for s in (0, math.inf)], rel=1e-12)
