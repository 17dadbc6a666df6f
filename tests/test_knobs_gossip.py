"""Notebook 04's knob without a browser: the topology and N controls redraw (1 − gap)^t from the mixing matrix,
with the measured pure-averaging decay beside it where the notebook ran that very graph."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest

from distlab.architectures import topology as topo
from distlab.viz import decentralized as gviz


def averaging_run(topology: str, n: int = 4, steps: int = 15):
    """Stands in for a pure-averaging run on real ranks: the same consensus column, from the matrix alone."""
    xi = topo.simulate_gossip(topo.mixing_matrix(topo.graph(topology, n)), steps)
    rows = [{"rank": r, "step": s, "consensus": x} for s, x in enumerate(xi) for r in range(n)]
    return SimpleNamespace(world_size=n, metrics=pd.DataFrame(rows))


@pytest.fixture(scope="module")
def knob():
    box = gviz.consensus_knob({t: averaging_run(t) for t in ("ring", "random", "full")})
    (topology, size), fig = box.children[0].children, box.children[1]
    return SimpleNamespace(topology=topology, size=size, fig=fig)


def plotted_rate(fig) -> float:
    predicted = fig.data[0].y
    return predicted[1] / predicted[0]


def test_the_knob_opens_on_the_measured_ring_with_its_decay_beside_the_prediction(knob):
    assert (knob.topology.value, knob.size.value) == ("ring", 4)
    assert plotted_rate(knob.fig) == pytest.approx(1 / 3, abs=1e-12)  # slem of the 4-ring's W
    measured = knob.fig.data[1].y
    assert len(measured) == 16 and measured[0] == 1.0
    assert measured[9] / measured[8] == pytest.approx(plotted_rate(knob.fig), rel=1e-6)


@pytest.mark.parametrize("topology, n", [("exponential", 1024), ("exponential", 16), ("torus", 64), ("ring", 32),
                                         ("random", 128)])
def test_setting_the_controls_plots_the_spectral_gap_of_that_mixing_matrix(knob, topology, n):
    knob.topology.value, knob.size.value = topology, n
    gap = topo.spectral_gap(topo.mixing_matrix(topo.graph(topology, n)))
    assert plotted_rate(knob.fig) == pytest.approx(1 - gap, abs=1e-12)
    assert knob.fig.data[0].y[20] == pytest.approx((1 - gap) ** 20, rel=1e-9)
    assert f"gap 1 − |λ₂(W)| = {gap:.4f}" in knob.fig.layout.title.text
    assert len(knob.fig.data[1].y) == 0  # no run of this graph in the notebook: the prediction alone


def test_the_exponential_graphs_gap_falls_like_two_over_log2_n(knob):
    knob.topology.value = "exponential"
    for n in (16, 128, 1024):
        knob.size.value = n
        assert 1 - plotted_rate(knob.fig) == pytest.approx(2 / math.log2(n), abs=1e-9)


def test_the_measured_decay_appears_only_for_the_graph_that_was_run(knob):
    knob.topology.value, knob.size.value = "exponential", 4  # on 4 nodes i ± 1, 2 is the complete graph
    assert "full of 4 real ranks" in knob.fig.data[1].name and len(knob.fig.data[1].y) > 0
    knob.topology.value = "torus"  # a 2 × 2 torus is a 4-cycle too, but not the ring's edges: not that run
    assert len(knob.fig.data[1].y) == 0
    assert knob.size.options[0] == 4 and knob.size.options[-1] == 1024
