"""Notebook 02's knob without a browser: move N and S, and the figure's y-values are the alpha-beta model's;
the size above which the ring beats the tree grows with N and with alpha/beta, as the lesson says."""

import math

import plotly.graph_objects as go
import pytest

from distlab.communication import cost
from distlab.viz import communication as vc

ALPHA, BETA = 50e-6, 1e-9  # 50 µs per message, 1 GB/s
SIZES = [2 ** k for k in range(10, 25, 2)]


def timings(n: int = 4) -> list[dict]:
    """Rows shaped like collectives.time_all_reduces's, timed exactly by the model (plus gloo's, ignored)."""
    return [{"algorithm": a, "bytes": s, "world_size": n, "calls": 3,
             "seconds": vc.modelled_seconds(ALPHA, BETA, a, n, s) if a != "gloo" else 1.0}
            for s in SIZES for a in (*cost.ALGORITHMS, "gloo")]


def figure(knob) -> go.FigureWidget:
    return knob.children[1]


def traces(fig: go.FigureWidget, name: str) -> list:
    return [t for t in fig.data if t.name == name]


def test_the_machine_fit_recovers_alpha_and_beta():
    alpha, beta = vc.machine_alpha_beta(timings())
    assert alpha == pytest.approx(ALPHA, rel=1e-6) and beta == pytest.approx(BETA, rel=1e-6)
    shrinking = [dict(r, seconds=2 ** 24 / r["bytes"] * 1e-3) for r in timings()]  # bigger is faster: no model
    with pytest.raises(ValueError, match="no positive alpha and beta"):
        vc.machine_alpha_beta(shrinking)


def test_moving_the_sliders_redraws_the_model_formula():
    knob = vc.cost_knob(timings())
    ranks, payload = knob.children[0].children
    fig = figure(knob)
    for n, s in ((4, 2 ** 20), (16, 2 ** 12), (64, 2 ** 28)):
        ranks.value, payload.value = n, s
        for algorithm, name in vc.MODELLED.items():
            by_size, by_ranks = traces(fig, f"{name}: model")
            assert list(by_size.y) == pytest.approx(
                [ALPHA * cost.message_rounds(algorithm, n) + BETA * cost.critical_bytes(algorithm, b // 4, 4, n)
                 for b in by_size.x], rel=1e-12)
            assert list(by_ranks.y) == pytest.approx(
                [ALPHA * cost.message_rounds(algorithm, k) + BETA * cost.critical_bytes(algorithm, s // 4, 4, k)
                 for k in by_ranks.x], rel=1e-12)
        ring = traces(fig, "ring: model")[1]
        assert list(ring.y)[n - 2] == pytest.approx(ALPHA * 2 * (n - 1) + BETA * 2 * (n - 1) / n * s, rel=1e-3)
        assert list(fig.data[-2].x) == [s, s] and list(fig.data[-1].x) == [n, n]
        measured = traces(fig, "ring: measured, N = 4")[0]
        assert measured.visible is (n == 4)  # measured points only beside the model at the measured N
        assert f"N = {n}" in fig.layout.title.text


def test_the_ring_never_loses_to_naive_and_beats_the_tree_above_a_crossover_that_grows_with_n():
    knob = vc.cost_knob(timings())
    ranks, payload = knob.children[0].children
    fig = figure(knob)
    crossovers = []
    for n in (4, 8, 16, 32, 64):
        ranks.value = n
        naive, ring, tree = (list(traces(fig, f"{vc.MODELLED[a]}: model")[0].y)
                             for a in ("naive", "ring", "recursive_doubling"))
        assert all(r <= v * (1 + 1e-12) for r, v in zip(ring, naive))  # same messages in a row, fewer bytes
        crossover = cost.crossover_bytes(ALPHA, BETA, n)
        k = math.log2(n)
        assert crossover == pytest.approx(ALPHA * (2 * (n - 1) - k) / (BETA * (k - 2 * (n - 1) / n)), rel=1e-9)
        sizes = list(traces(fig, "ring: model")[0].x)
        for s, r, t in zip(sizes, ring, tree):
            assert (r < t) == (s > crossover), (n, s)
        crossovers.append(crossover)
        assert f"{crossover:,.0f} bytes" in fig.layout.title.text
    assert crossovers == sorted(crossovers) and crossovers[-1] > 3 * crossovers[0]
    assert cost.crossover_bytes(ALPHA, BETA, 2) is None  # on 2 ranks the tree is one swap: the ring never wins
    assert cost.crossover_bytes(2 * ALPHA, BETA, 8) == pytest.approx(2 * cost.crossover_bytes(ALPHA, BETA, 8))
