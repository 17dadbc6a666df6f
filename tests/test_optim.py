"""SGD, momentum SGD and Adam from their equations against torch.optim, and the 2-D trajectories of notebook 06."""

import copy

import pytest
import torch
import torch.nn.functional as F

import distlab as dl
from distlab.optim import rules as optim
from distlab.viz import optim as viz

STEPS = 200


@pytest.fixture(scope="module")
def problem():
    """A small float64 MLP and a fixed batch: each optimizer starts from a copy."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 3, (64,))
    return dl.models.mlp(8, 16, 3).double(), x, y


def train(problem, make_optimizer, steps=STEPS, lr_at=None, on_change=None):
    """Parameters after `steps` full-batch steps; lr_at={step: lr} changes η before that step."""
    base, x, y = problem
    model = copy.deepcopy(base)
    opt = make_optimizer(model.parameters())
    for step in range(steps):
        if lr_at and step in lr_at:
            if on_change:
                on_change(opt, lr_at[step])
            opt.param_groups[0]["lr"] = lr_at[step]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach(), opt


PAIRS = {
    "sgd": (lambda p: optim.SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "momentum": (lambda p: optim.MomentumSGD(p, lr=0.05, momentum=0.9),
                 lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    "adam": (lambda p: optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-7),
             lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-7)),
}


@pytest.mark.parametrize("name", PAIRS)
def test_200_steps_match_torch_optim_in_float64(problem, name):
    ours, theirs = PAIRS[name]
    start = torch.nn.utils.parameters_to_vector(problem[0].parameters()).detach()
    mine, _ = train(problem, ours)
    reference, _ = train(problem, theirs)
    assert (mine - start).abs().max() > 0.05  # the parameters really moved
    assert (mine - reference).abs().max() < 1e-6


def test_momentum_folding_differs_from_torch_exactly_by_the_old_lr_when_lr_changes(problem):
    """v ← γv + ηg keeps past gradients at their own η; torch's b ← γb + g; θ ← θ − ηb rescales them all.

    At the step where η₁ becomes η₂: θ_ours − θ_torch = −γ(η₁ − η₂)·b, with b torch's buffer before the step.
    """
    ours, theirs = PAIRS["momentum"]
    change, lr1, lr2, gamma = 100, 0.05, 0.005, 0.9
    before_ours, _ = train(problem, ours, steps=change)
    before_torch, torch_opt = train(problem, theirs, steps=change)
    assert (before_ours - before_torch).abs().max() < 1e-6  # constant η so far: the same trajectory
    buffer = torch.cat([torch_opt.state[p]["momentum_buffer"].reshape(-1) for p in torch_opt.param_groups[0]["params"]])
    after_ours, _ = train(problem, ours, steps=change + 1, lr_at={change: lr2})
    after_torch, _ = train(problem, theirs, steps=change + 1, lr_at={change: lr2})
    assert torch.allclose(after_ours - after_torch, -gamma * (lr1 - lr2) * buffer, atol=1e-9)
    end_ours, _ = train(problem, ours, lr_at={change: lr2})
    end_torch, _ = train(problem, theirs, lr_at={change: lr2})
    assert (end_ours - end_torch).abs().max() > 1e-3


def test_rescaling_the_velocity_when_lr_changes_gives_torchs_trajectory_back(problem):
    """Handling the folding explicitly: v ← (η₂/η₁)·v at the change makes v = η b again."""

    def rescale(opt, new_lr):
        for state in opt.state.values():
            state["velocity"].mul_(new_lr / opt.param_groups[0]["lr"])

    ours, theirs = PAIRS["momentum"]
    mine, _ = train(problem, ours, lr_at={50: 0.01, 120: 0.002}, on_change=rescale)
    reference, _ = train(problem, theirs, lr_at={50: 0.01, 120: 0.002})
    assert (mine - reference).abs().max() < 1e-6


@pytest.mark.parametrize("make, message", [
    (lambda p: optim.SGD(p, lr=0.0), "lr"),
    (lambda p: optim.MomentumSGD(p, lr=0.1, momentum=1.0), "momentum"),
    (lambda p: optim.Adam(p, betas=(0.9, 1.5)), "betas"),
    (lambda p: optim.make("adagrad", p, lr=0.1), "optimizer must be one of"),
])
def test_bad_hyper_parameters_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make([torch.zeros(2, requires_grad=True)])


def test_trajectories_show_what_the_notebook_says():
    """On the ill-conditioned quadratic momentum beats SGD at the same η; on the saddle, SGD with a small η
    is still near the saddle after 200 steps while momentum and Adam reached a minimum at y = ±1."""
    path = viz.trajectory("ill-conditioned quadratic", "sgd", lr=0.038)
    assert path.shape == (201, 2) and tuple(path[0]) == viz.SURFACES["ill-conditioned quadratic"].start
    quad = viz.SURFACES["ill-conditioned quadratic"].loss
    loss = {name: quad(*torch.tensor(viz.trajectory("ill-conditioned quadratic", name, **h)[-1])).item()
            for name, h in {"sgd": {"lr": 0.038}, "momentum": {"lr": 0.038, "momentum": 0.9}}.items()}
    assert loss["momentum"] < loss["sgd"] / 10
    ends = {name: viz.trajectory("saddle", name, **h)[-1] for name, h in
            {"sgd": {"lr": 0.02}, "momentum": {"lr": 0.02, "momentum": 0.9}, "adam": {"lr": 0.05}}.items()}
    assert abs(ends["sgd"][1]) < 0.2
    assert abs(abs(ends["momentum"][1]) - 1) < 0.01 and abs(abs(ends["adam"][1]) - 1) < 0.01


def test_explorer_redraws_only_the_path_whose_slider_moved():
    box = viz.explorer("ill-conditioned quadratic", steps=50)
    (left, right), fig = box.children[0].children, box.children[1]
    _, lr, adam_lr = left.children
    momentum, beta1, beta2 = right.children
    paths = {t.name: list(t.x) for t in fig.data[1:4]}
    momentum.value = 0.5
    assert list(fig.data[2].x) != paths["momentum SGD"]
    assert list(fig.data[1].x) == paths["SGD"] and list(fig.data[3].x) == paths["Adam"]
    beta2.value = 0.9
    assert list(fig.data[3].x) != paths["Adam"]
    expected = viz.trajectory("ill-conditioned quadratic", "adam", 50, lr=adam_lr.value, betas=(beta1.value, 0.9))
    assert list(fig.data[3].x) == pytest.approx(list(expected[:, 0]))
