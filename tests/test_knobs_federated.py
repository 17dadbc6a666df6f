"""Notebook 05's knob: Dirichlet α, client fraction C and local epochs E against accuracy, redrawn from a grid of
real simulated runs."""
from __future__ import annotations

import pytest
import torch

from distlab.architectures.federated import partition as fd
from distlab.architectures.federated.simulation import Config, simulate
from distlab.viz import federated as viz

ALPHAS, FRACTIONS, EPOCHS = (0.1, 0.5, 10.0), (0.3, 1.0), (1, 5)


@pytest.fixture(scope="module")
def grid():
    """The notebook's grid (the defaults of knob_grid), on one thread as in the notebook (tiny tensors)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield viz.knob_grid()
    finally:
        torch.set_num_threads(threads)


def test_the_grid_holds_every_setting_and_iid_for_each_c_and_e(grid: dict) -> None:
    assert set(grid) == {(a, c, e) for a in (*ALPHAS, viz.IID) for c in FRACTIONS for e in EPOCHS}
    assert all(len(run.history) == 15 for run in grid.values())


def test_setting_the_controls_draws_that_settings_simulation_against_iid(grid: dict) -> None:
    controls, fig = viz.federated_knob(grid).children
    alpha, fraction, epochs = controls.children
    for a, c, e in [(0.1, 0.3, 5), (10.0, 1.0, 1), (0.5, 0.3, 1)]:
        alpha.value, fraction.value, epochs.value = a, c, e
        fresh = simulate(fd.digits(10, "dirichlet", alpha=a),
                         Config(rounds=15, fraction=c, epochs=e, batch_size=10, lr=0.1))
        assert list(fig.data[0].y) == pytest.approx([r["accuracy"] for r in fresh.history], abs=1e-6)
        assert list(fig.data[0].x) == list(range(1, 16))
        assert list(fig.data[1].y) == [r["accuracy"] for r in grid[viz.IID, c, e].history]
        assert f"final accuracy {fresh.accuracy:.3f}" in fig.layout.title.text
        assert fig.data[0].name == f"Dirichlet α={a:g}"


def test_lower_alpha_gives_lower_or_equal_final_accuracy_at_fixed_c_and_e(grid: dict) -> None:
    for c in FRACTIONS:
        for e in EPOCHS:
            finals = [grid[a, c, e].accuracy for a in ALPHAS]
            assert finals == sorted(finals), (c, e, finals)
            assert finals[0] < grid[viz.IID, c, e].accuracy - 0.05, (c, e)  # α = 0.1 is far below IID
