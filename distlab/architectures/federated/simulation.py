"""Federated learning in one process: many clients, one round at a time (McMahan et al., 2017).

A round: the server samples a fraction C of the clients; each trains the global model for E local
epochs of batch size B on its own data (plus FedProx's proximal term μ/2·‖w - w_global‖², Li et al.,
2020); the server aggregates their updates Δ_k = w_k - w_global and steps its optimizer.

Two ways to train the sampled clients, same arithmetic: `train_client` (one client after another,
an nn.Module and torch.optim.SGD, what the client ranks of processes.py run) and
`train_clients_vectorized` (all sampled clients at once: their parameters stacked along a client
dimension, one forward and one backward for all). Its gradients are either written out as batched
matrix products (`stacked_mlp_gradients`, the fast one) or taken by autograd through any model run by
torch.func.functional_call under torch.func.vmap (`vmapped`, the general built-in); tests check they agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from distlab.models import largest_difference as largest_difference  # re-exported (notebooks 05, benchmarks)
from distlab.models import mlp

from .aggregation import AGGREGATORS, ServerOptimizer, Update, aggregate
from .partition import Federation
from .privacy import SecureAggregation, clip_update, gaussian_noise

ATTACKS = ("sign_flip", "scaled", "label_flip")


@dataclass
class Config:
    """One federated training run. Names follow the FedAvg paper: C = fraction, E = epochs, B = batch_size."""

    model: tuple[int, ...] = (64, 32, 10)  # dl.models.mlp sizes; (60, 10) is softmax regression
    rounds: int = 20
    fraction: float = 1.0  # C: share of clients sampled each round
    epochs: int = 1  # E: local passes over the client's data
    batch_size: int = 10  # B
    lr: float = 0.1  # the clients' SGD step
    mu: float = 0.0  # FedProx proximal term (0: FedAvg)
    server: str = "sgd"  # "sgd" (lr 1: FedAvg), "adam" (FedAdam), "yogi" (FedYogi)
    server_lr: float = 1.0
    rule: str = "fedavg"  # aggregator: fedavg, median, trimmed_mean, krum, multi_krum
    trim_fraction: float = 0.2
    num_malicious: int | None = None  # Krum's f; None: the attackers' share of the round
    multi: int = 0
    dropout: float = 0.0  # chance that a sampled client never replies
    stragglers: float = 0.0  # chance that a sampled client hits the deadline with only part of its steps done
    drop_stragglers: bool = True  # FedAvg drops late clients; FedProx keeps their partial work
    attackers: float = 0.0  # share of all clients that are malicious
    attack: str = "sign_flip"  # sign_flip (Δ → -scale·Δ), scaled (Δ → scale·Δ), label_flip (y → C-1-y)
    attack_scale: float = 4.0
    clip: float | None = None  # differential privacy: clip each update to this L2 norm...
    noise_multiplier: float = 0.0  # ...and add N(0, (noise_multiplier·clip)²) to the sum
    secure: bool = False  # secure aggregation: the server only sees pairwise-masked updates
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction (C) must be in (0, 1], got {self.fraction!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.rounds < 0:
            raise ValueError("epochs (E) and batch_size (B) must be >= 1 and rounds >= 0")
        if self.rule not in AGGREGATORS:
            raise ValueError(f"rule must be one of {sorted(AGGREGATORS)}, got {self.rule!r}")
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {ATTACKS}, got {self.attack!r}")
        for name in ("dropout", "stragglers", "attackers"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if (self.clip is not None or self.secure) and self.rule != "fedavg":
            raise ValueError("clip/secure work with rule='fedavg' only (a robust rule needs to see each update)")


def generator(*keys: int) -> torch.Generator:
    """A random stream named by integers (seed, round, client...): every engine and rank draws the same numbers."""
    state = 0
    for key in keys:
        state = (state * 1_000_003 + int(key) + 1) % (2 ** 61 - 1)
    return torch.Generator().manual_seed(state)


# -- the round plan: who is sampled, who drops out, who is late, who is malicious -----------------

def local_steps(n: int, config: Config) -> int:
    return config.epochs * math.ceil(n / config.batch_size)


def plan_round(sizes: list[int], config: Config, round: int) -> list[tuple[int, int]]:
    """(client, steps it completes) for each client whose update reaches the server this round."""
    g = generator(config.seed, round, 1)
    sampled = torch.randperm(len(sizes), generator=g)[:max(1, round_half(config.fraction * len(sizes)))]
    dropped = torch.rand(len(sampled), generator=g) < config.dropout
    late = torch.rand(len(sampled), generator=g) < config.stragglers
    done = torch.rand(len(sampled), generator=g)
    plan = []
    for client, drop, slow, share in zip(sampled.tolist(), dropped.tolist(), late.tolist(), done.tolist()):
        steps = local_steps(sizes[client], config)
        if drop or (slow and config.drop_stragglers):
            continue
        plan.append((client, 1 + int(share * (steps - 1)) if slow else steps))  # late: 1..steps done
    return sorted(plan)


def round_half(x: float) -> int:
    return int(math.floor(x + 0.5))


def attackers_of(num_clients: int, config: Config) -> set[int]:
    """The malicious clients: a fixed random share of all clients."""
    order = torch.randperm(num_clients, generator=generator(config.seed, 0, 2))
    return set(order[:round_half(config.attackers * num_clients)].tolist())


def client_data(fed: Federation, client: int, config: Config, attackers: set[int]):
    x, y = fed.xs[client], fed.ys[client]
    if client in attackers and config.attack == "label_flip":
        y = fed.num_classes - 1 - y
    return x, y


def batches(n: int, steps: int, config: Config, round: int, client: int) -> torch.Tensor:
    """The client's mini-batches, [steps, B]: E shuffled passes cut into batches of B (the last one
    of a pass padded with -1), the first `steps` of them."""
    g = generator(config.seed, round, 3, client)
    per_epoch = math.ceil(n / config.batch_size)
    padded = torch.full((config.epochs, per_epoch * config.batch_size), -1)
    for e in range(config.epochs):
        padded[e, :n] = torch.randperm(n, generator=g)
    return padded.view(-1, config.batch_size)[:steps]


def poison(update: Update, client: int, config: Config, attackers: set[int]) -> Update:
    """What a malicious client sends instead of its honest update."""
    if client not in attackers or config.attack == "label_flip":
        return update
    scale = -config.attack_scale if config.attack == "sign_flip" else config.attack_scale
    return [scale * d for d in update]


# -- local training: one client after another, or all at once -------------------------------------

def initial_params(config: Config) -> Update:
    torch.manual_seed(config.seed)
    return [p.detach().clone() for p in mlp(*config.model).parameters()]


def train_client(global_params: Update, x, y, client_batches: torch.Tensor, config: Config) -> Update:
    """Local SGD on one client, from the global model; returns its update Δ = w - w_global."""
    model = mlp(*config.model)
    with torch.no_grad():
        for p, g in zip(model.parameters(), global_params):
            p.copy_(g)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    for idx in client_batches:
        idx = idx[idx >= 0]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if config.mu:
            loss = loss + config.mu / 2 * sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p.detach() - g for p, g in zip(model.parameters(), global_params)]


def stacked_activations(params: Update, x: torch.Tensor) -> list[torch.Tensor]:
    """dl.models.mlp's forward with a leading client dimension: weights [clients, out, in], biases
    [clients, out], x [clients, batch, in]; one batched matrix product per layer. Returns the input,
    each hidden layer's ReLU output and the logits."""
    activations = [x]
    for i in range(0, len(params), 2):
        z = torch.baddbmm(params[i + 1].unsqueeze(1), activations[-1], params[i].transpose(1, 2))
        activations.append(torch.relu(z) if i < len(params) - 2 else z)
    return activations


def stacked_mlp(params: Update, x: torch.Tensor) -> torch.Tensor:
    return stacked_activations(params, x)[-1]


def vmapped(config: Config) -> Callable:
    """The same forward for any model: torch.func.functional_call under torch.func.vmap over the clients."""
    model = mlp(*config.model)
    names = [name for name, _ in model.named_parameters()]
    return vmap(lambda params, xb: functional_call(model, dict(zip(names, params)), (xb,)))


# A gradient function: (stacked params, x [clients, B, in], y [clients, B], weight [clients, B, 1]) -> the
# gradients of Σ weight · cross-entropy, stacked like the params.

def stacked_mlp_gradients(params: Update, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> Update:
    """Backpropagation through stacked_mlp written out: d logits = weight · (softmax - one_hot(y)), then
    per layer dW = dzᵀ·a, db = Σ dz, da = dz·W masked by the ReLU. No autograd graph: each local step
    of a small model costs a few kernel launches, and the steps are what a round is made of."""
    activations = stacked_activations(params, x)
    logits = activations.pop()
    e = (logits - logits.amax(-1, keepdim=True)).exp_()  # softmax by hand: torch.softmax is 5× slower on 10 classes
    dz = e.mul_(weight / e.sum(-1, keepdim=True)).scatter_add_(-1, y.unsqueeze(-1), -weight)
    grads: Update = []
    for i in range(len(params) - 2, -1, -2):
        a = activations.pop()
        grads[:0] = [torch.bmm(dz.transpose(1, 2), a), dz.sum(1)]
        if i:
            dz = torch.bmm(dz, params[i]).mul_(a > 0)
    return grads


def autograd_gradients(forward: Callable) -> Callable:
    """The same gradients for any forward(stacked params, x), by torch.autograd."""
    def gradients(params: Update, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> Update:
        leaves = [p.detach().requires_grad_() for p in params]
        losses = F.cross_entropy(forward(leaves, x).flatten(0, 1), y.flatten(), reduction="none")
        return list(torch.autograd.grad((losses * weight.flatten()).sum(), leaves))
    return gradients


def train_clients_vectorized(global_params: Update, data: list[tuple], schedules: list[torch.Tensor],
                             config: Config, gradients: Callable = stacked_mlp_gradients) -> list[Update]:
    """Local SGD on all clients together: parameters stacked [clients, ...], one gradients(...) call per step.

    Clients are sorted by how many steps they take, so at step t the ones still training are a prefix
    and only that prefix is computed. Batch padding (-1) has zero weight in the loss.
    """
    m, steps = len(data), [len(s) for s in schedules]
    order = sorted(range(m), key=lambda i: -steps[i])
    longest = steps[order[0]]
    x_all = torch.cat([data[i][0] for i in order])  # every client's examples, one after another
    y_all = torch.cat([data[i][1] for i in order])
    offsets = torch.tensor([0] + [len(data[i][1]) for i in order]).cumsum(0)
    idx = torch.full((m, longest, config.batch_size), -1)
    for row, i in enumerate(order):
        idx[row, :steps[i]] = schedules[i]
    real = idx >= 0
    weight = (real / real.sum(-1, keepdim=True).clamp(min=1)).unsqueeze(-1)  # 1 / (examples in the batch)
    idx = torch.where(real, idx + offsets[:-1].view(m, 1, 1), 0).transpose(0, 1).contiguous()  # [step, client, B]
    weight, y_steps = weight.transpose(0, 1).contiguous(), y_all[idx]
    active = (torch.tensor(steps)[order] > torch.arange(longest).unsqueeze(1)).sum(1).tolist()  # still training at t
    stacked = [g.expand(m, *g.shape).clone() for g in global_params]
    for t, a in enumerate(active):
        params = [p[:a] for p in stacked]  # views: the updates below write into stacked
        x = x_all.index_select(0, idx[t, :a].flatten()).view(a, config.batch_size, -1)
        grads = gradients(params, x, y_steps[t, :a], weight[t, :a])
        for p, grad, g in zip(params, grads, global_params):
            if config.mu:
                grad.add_(p - g, alpha=config.mu)
            p.sub_(grad, alpha=config.lr)
    deltas = [p - g for p, g in zip(stacked, global_params)]
    updates: list[Update] = [[] for _ in range(m)]
    for row, i in enumerate(order):
        updates[i] = [d[row] for d in deltas]
    return updates


def first_round_results(fed: Federation, config: Config) -> list[tuple[Update, int]]:
    """Every client's honest (update, num_examples) from the initial model: material to aggregate by hand."""
    params = initial_params(config)
    return [(train_client(params, x, y, batches(len(y), local_steps(len(y), config), config, 0, k), config), len(y))
            for k, (x, y) in enumerate(zip(fed.xs, fed.ys))]


# -- the server -----------------------------------------------------------------------------------

def server_update(global_params: Update, results: list[tuple[Update, int]], config: Config,
                  optimizer: ServerOptimizer, round: int, num_clients: int) -> Update:
    """Aggregate the round's (update, num_examples) pairs and step the server optimizer."""
    if not results:
        return global_params
    if config.clip is not None:  # DP-FedAvg (McMahan et al., 2018): clip, sum, noise, divide by the expected count
        expected = max(1, round_half(config.fraction * num_clients))
        clipped = [clip_update(u, config.clip) for u, _ in results]
        total = [torch.stack(layer).sum(0) for layer in zip(*clipped)]
        noisy = gaussian_noise(total, config.noise_multiplier * config.clip, generator(config.seed, round, 4))
        delta = [t / expected for t in noisy]
    elif config.secure:
        secure = SecureAggregation(len(results), seed=config.seed * 7919 + round)
        masked = {k: secure.mask(k, [n * d for d in u]) for k, (u, n) in enumerate(results)}
        total = sum(n for _, n in results)
        delta = [s / total for s in secure.unmask_sum(masked)]
    else:
        f = config.num_malicious
        if f is None:
            f = round_half(config.attackers * len(results))
        delta = aggregate(results, config.rule, config.trim_fraction, min(f, len(results) - 1), config.multi)
    return optimizer.step(global_params, [torch.as_tensor(d) for d in delta])


def evaluate(params: Update, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Test accuracy and loss of the global model; with two classes also precision and recall of class 1."""
    with torch.no_grad():
        logits = stacked_mlp([p.unsqueeze(0) for p in params], x.unsqueeze(0))[0]
        predicted = logits.argmax(1)
        # cross-entropy by hand: 4× faster than F's here
        loss = logits.logsumexp(1) - logits.gather(1, y.unsqueeze(1)).squeeze(1)
        out = {"accuracy": (predicted == y).float().mean().item(), "loss": loss.mean().item()}
    if logits.shape[1] == 2:
        hits = ((predicted == 1) & (y == 1)).sum().item()
        out["precision"] = hits / max(1, (predicted == 1).sum().item())
        out["recall"] = hits / max(1, (y == 1).sum().item())
    return out


@dataclass
class FederatedRun:
    params: Update  # the final global model
    history: list[dict]  # one row per round: round, accuracy, loss, clients, seconds

    def rounds_to(self, accuracy: float) -> int | None:
        """The first round whose test accuracy reaches `accuracy` (None: never)."""
        return next((row["round"] for row in self.history if row["accuracy"] >= accuracy), None)

    @property
    def accuracy(self) -> float:
        return self.history[-1]["accuracy"]


ENGINES = ("vectorized", "vmap", "loop")


def simulate(fed: Federation, config: Config, engine: str = "vectorized",
             on_round: Callable[[dict], None] | None = None) -> FederatedRun:
    """Run config.rounds rounds of federated training in this process; engine: "vectorized" (batched
    matrix products), "vmap" (functional_call under vmap) or "loop" (one client after another)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    params, optimizer = initial_params(config), ServerOptimizer(config.server, config.server_lr)
    attackers, sizes = attackers_of(fed.num_clients, config), fed.sizes
    history = []
    for r in range(config.rounds):
        start = time.perf_counter()
        plan = plan_round(sizes, config, r)
        data = [client_data(fed, k, config, attackers) for k, _ in plan]
        schedules = [batches(sizes[k], steps, config, r, k) for k, steps in plan]
        if engine != "loop" and plan:
            gradients = stacked_mlp_gradients if engine == "vectorized" else autograd_gradients(vmapped(config))
            updates = train_clients_vectorized(params, data, schedules, config, gradients)
        else:
            updates = [train_client(params, x, y, s, config) for (x, y), s in zip(data, schedules)]
        results = [(poison(u, k, config, attackers), sizes[k]) for u, (k, _) in zip(updates, plan)]
        params = server_update(params, results, config, optimizer, r, fed.num_clients)
        row = {"round": r + 1, "clients": len(plan), "seconds": time.perf_counter() - start,
               **evaluate(params, fed.x_test, fed.y_test)}
        history.append(row)
        if on_round is not None:
            on_round(row)
    return FederatedRun(params, history)
