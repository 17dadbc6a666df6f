"""SGD, momentum SGD and Adam written from their update rules (outline §4.1), as torch optimizers.

Each step reads `p.grad`. In data parallelism the gradients are first averaged across ranks,
(1/N) Σᵢ ∇Jᵢ(θ) (see optim/distributed.py), and the same step applies the average.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


def _check(name: str, value: float, low: float, high: float = float("inf"), open_low: bool = False) -> None:
    if not (low < value if open_low else low <= value) or not value < high:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}), got {value!r}")


def _with_grad(group: dict):
    return [p for p in group["params"] if p.grad is not None]


def _evaluate(closure):
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class SGD(Optimizer):
    """θ ← θ − η ∇J(θ)  (Robbins & Monro 1951)."""

    def __init__(self, params, lr: float):
        _check("lr", lr, 0.0, open_low=True)
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            for p in _with_grad(group):
                p.add_(p.grad, alpha=-group["lr"])
        return loss


class MomentumSGD(Optimizer):
    """v ← γ v + η ∇J(θ);  θ ← θ − v  (Polyak 1964), the outline's form: η is folded into v.

    torch.optim.SGD(momentum=γ) keeps b ← γ b + ∇J(θ) and steps θ ← θ − η b. With a constant η,
    v = η b at every step: the same trajectory. When η changes, torch applies the new η to the whole
    history b, while v keeps each past gradient scaled by the η of its own step: the trajectories part.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9):
        _check("lr", lr, 0.0, open_low=True)
        _check("momentum", momentum, 0.0, 1.0)
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            for p in _with_grad(group):
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                v = state["velocity"]
                v.mul_(group["momentum"]).add_(p.grad, alpha=group["lr"])
                p.sub_(v)
        return loss


def adam_update(param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int,
                lr: float, beta1: float, beta2: float, eps: float) -> None:
    """One Adam step in place (Kingma & Ba 2015, Algorithm 1), t counting from 1.

    m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  m̂ = m/(1−β₁ᵗ);  v̂ = v/(1−β₂ᵗ);  θ ← θ − η m̂/(√v̂ + ε)
    """
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    param.sub_(lr * m_hat / (v_hat.sqrt() + eps))


class Adam(Optimizer):
    """Adam: moment estimates m, v with bias correction (Kingma & Ba 2015)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        _check("lr", lr, 0.0, open_low=True)
        _check("betas[0]", betas[0], 0.0, 1.0)
        _check("betas[1]", betas[1], 0.0, 1.0)
        _check("eps", eps, 0.0)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in _with_grad(group):
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["t"] += 1
                adam_update(p, p.grad, state["m"], state["v"], state["t"], group["lr"], beta1, beta2, group["eps"])
        return loss


OPTIMIZERS = {"sgd": SGD, "momentum": MomentumSGD, "adam": Adam}


def make(name: str, params, **hyper) -> Optimizer:
    """One of distlab's optimizers by name: "sgd", "momentum" or "adam"."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name](params, **hyper)
