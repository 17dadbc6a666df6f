"""Notebook 05b's knob without a browser: the σ slider marks ε from the accountant and accuracy from real runs."""

import pytest

from distlab.architectures.federated import partition as fd
from distlab.architectures.federated.privacy import epsilon, poisson_sampling
from distlab.architectures.federated.simulation import Config, simulate
from distlab.viz.privacy import privacy_knob

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RATE, ROUNDS = 0.5, 4


@pytest.fixture(scope="module")
def accuracy():
    fed = fd.digits(10, "iid")
    return {s: simulate(fed, poisson_sampling(Config(rounds=ROUNDS, clip=0.5, noise_multiplier=s), RATE)).accuracy
            for s in (0.5, 1.0, 4.0)}


def test_moving_sigma_marks_the_accountants_epsilon_and_that_runs_accuracy(accuracy):
    box = privacy_knob(accuracy, RATE, ROUNDS, delta=1e-5)
    (slider, readout), fig = box.children[0].children, box.children[1]
    for sigma in (4.0, 0.5, 1.0):
        slider.value = sigma
        assert fig.data[2].x == (sigma,) and fig.data[2].y == (epsilon(sigma, RATE, ROUNDS, 1e-5),)
        assert fig.data[3].x == (sigma,) and fig.data[3].y == (accuracy[sigma],)
        assert f"ε = <b>{epsilon(sigma, RATE, ROUNDS, 1e-5):.2f}</b>" in readout.value


def test_epsilon_falls_as_sigma_rises(accuracy):
    fig = privacy_knob(accuracy, RATE, ROUNDS).children[1]
    sigmas, eps = fig.data[0].x, fig.data[0].y
    assert list(sigmas) == sorted(accuracy) and all(a > b for a, b in zip(eps, eps[1:]))
