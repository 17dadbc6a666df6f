"""Distributed reinforcement learning: rollout actors collect whole CartPole episodes, a learner updates.

The actor–learner split of A3C / IMPALA (Mnih et al. 2016, arXiv:1602.01783; Espeholt et al. 2018,
arXiv:1802.01561): actors run the environment with a copy of the policy and send trajectories; one
learner turns them into a policy-gradient step (REINFORCE with a learned value baseline, i.e. A2C with
Monte-Carlo returns) and sends the new weights back. Every trajectory carries the policy version it was
collected with; the learner's version minus that is its staleness.

Three engines share the pieces below: `train_local` (one process), `train` (torch.distributed ranks via
dl.launch: rank 0 learns, ranks 1.. act) and on_ray.py (Ray actors).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..ranks import needs_gloo

OBS, ACTIONS = 4, 2  # CartPole-v1: 4 numbers observed, push left or right (episodes end by 500 steps)
MODES = ("sync", "async")
SOLVED, WINDOW = 195.0, 100  # CartPole-v1's classic bar: this average return over 100 consecutive episodes


class Policy(nn.Module):
    """Actor-critic for CartPole: action logits and a state value, two small MLPs."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.pi = nn.Sequential(nn.Linear(OBS, hidden), nn.Tanh(), nn.Linear(hidden, ACTIONS))
        self.v = nn.Sequential(nn.Linear(OBS, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pi(obs), self.v(obs).squeeze(-1)


def get_weights(policy: nn.Module) -> torch.Tensor:
    return nn.utils.parameters_to_vector(policy.parameters()).detach().clone()


def action_head_shapes(hidden: int) -> list[torch.Size]:
    """Shapes of W1, b1, W2, b2 of the policy's action head, which leads its flat weights (built on the
    meta device: no memory, no draw from torch's random stream)."""
    with torch.device("meta"):
        return [p.shape for p in Policy(hidden).pi.parameters()]


class Agent:
    """What acting needs: the policy's action head as numpy arrays (a forward pass costs microseconds,
    not torch's tens of) and a seeded random stream. Agent k draws from seed + 1000 k."""

    def __init__(self, actor: int = 0, seed: int = 0, hidden: int = 32):
        self.actor, self.shapes = actor, action_head_shapes(hidden)
        self.cuts = np.cumsum([math.prod(shape) for shape in self.shapes])
        self.set_weights(torch.zeros(int(self.cuts[-1])))  # uniform until the learner's weights arrive
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed + 1000 * self.actor)

    def set_weights(self, flat: torch.Tensor) -> None:
        pieces = np.split(flat[:self.cuts[-1]].double().cpu().numpy(), self.cuts[:-1])
        self.w1, self.b1, self.w2, self.b2 = (piece.reshape(shape) for piece, shape in zip(pieces, self.shapes))

    def act(self, obs: np.ndarray) -> int:
        """Sample from softmax(W2 tanh(W1 obs + b1) + b2): action 1 with probability sigmoid(l1 - l0)."""
        logits = self.w2 @ np.tanh(self.w1 @ obs + self.b1) + self.b2
        return int(self.rng.random() < 1.0 / (1.0 + np.exp(logits[0] - logits[1])))


@dataclass
class Trajectory:
    """One whole episode: T observations, the actions taken, the rewards; who collected it, with which policy."""

    obs: np.ndarray  # (T, 4) float32
    actions: np.ndarray  # (T,) int64
    rewards: np.ndarray  # (T,) float32
    version: int
    actor: int

    @staticmethod
    def from_rows(rows: list[tuple[np.ndarray, int, float]], version: int, actor: int) -> Trajectory:
        """From (observation, action, reward) per step."""
        states, actions, rewards = zip(*rows)
        return Trajectory(np.stack(states).astype(np.float32), np.array(actions, dtype=np.int64),
                          np.array(rewards, dtype=np.float32), version, actor)

    def __len__(self) -> int:
        return len(self.actions)

    def to_tensor(self) -> torch.Tensor:
        """[version, actor, T, obs..., actions..., rewards...] as one float32 message, on torch's default
        device (ctx.device in a rank), where it is sent from."""
        head = np.array([self.version, self.actor, len(self)], dtype=np.float32)
        body = [x.astype(np.float32).ravel() for x in (self.obs, self.actions, self.rewards)]
        return torch.from_numpy(np.concatenate([head, *body])).to(torch.get_default_device())

    @staticmethod
    def from_tensor(msg: torch.Tensor) -> Trajectory:
        msg = msg.cpu()  # the arrays live in host memory
        version, actor, n = (int(x) for x in msg[:3])
        obs, actions, rewards = msg[3:].split([n * OBS, n, n])
        return Trajectory(obs.view(n, OBS).numpy().copy(), actions.long().numpy(), rewards.numpy().copy(),
                          version, actor)


class Actor:
    """A rollout worker: its own CartPole and an Agent; `rollout` plays one whole episode."""

    def __init__(self, actor: int = 0, seed: int = 0, hidden: int = 32):
        self.actor, self.agent, self.env = actor, Agent(actor, seed, hidden), gym.make("CartPole-v1")
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the environment's and the agent's random streams (actor k uses seed + 1000 k)."""
        self.agent.reseed(seed)
        self.next_reset_seed: int | None = seed + 1000 * self.actor
        self.env_steps = 0

    def steps_taken(self) -> int:
        return self.env_steps

    def reset(self) -> np.ndarray:
        obs, _ = self.env.reset(seed=self.next_reset_seed)
        self.next_reset_seed = None  # later episodes continue the environment's stream
        return obs

    def step(self, action: int) -> tuple[np.ndarray, float, bool]:
        obs, reward, terminated, truncated, _ = self.env.step(action)
        self.env_steps += 1
        return obs, float(reward), terminated or truncated

    def rollout(self, weights: torch.Tensor, version: int) -> Trajectory:
        """One whole episode with these weights: no message crosses a process boundary until it ends."""
        self.agent.set_weights(weights)
        obs, rows, done = self.reset(), [], False
        while not done:
            action = self.agent.act(obs)
            next_obs, reward, done = self.step(action)
            rows.append((obs, action, reward))
            obs = next_obs
        return Trajectory.from_rows(rows, version, self.actor)

    def rollouts(self, weights: torch.Tensor, version: int, min_steps: int = 1) -> list[Trajectory]:
        """Whole episodes until at least `min_steps` steps (RLlib's rollout fragment): one call, many episodes."""
        out = [self.rollout(weights, version)]
        while sum(len(t) for t in out) < min_steps:
            out.append(self.rollout(weights, version))
        return out


# -- the outline's §5.2 loop as written: an environment and an agent, called once per step -----------------

class Environment:
    """The outline's environment: reset() gives a state, step(action) gives (next_state, reward, done, info),
    the classic gym 4-tuple the outline unpacks. Only the first reset is seeded."""

    def __init__(self, seed: int = 0):
        self.env, self.next_reset_seed = gym.make("CartPole-v1"), seed

    def reset(self) -> np.ndarray:
        obs, _ = self.env.reset(seed=self.next_reset_seed)
        self.next_reset_seed = None
        return obs

    def step(self, action: int) -> tuple[np.ndarray, float, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, float(reward), terminated or truncated, info


class OnlineAgent:
    """The outline's agent: `get_action` per step and `update(state, action, reward, next_state, done)` after
    every step. The update is one-step actor-critic: the TD error r + γV(s') − V(s) is the advantage of the
    action taken and the value's regression error; one Adam step per environment step."""

    def __init__(self, seed: int = 0, hidden: int = 32, lr: float = 0.005, gamma: float = 0.99):
        torch.manual_seed(seed)
        self.policy = Policy(hidden)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr)
        self.rng, self.gamma, self.updates = np.random.default_rng(seed), gamma, 0

    def get_action(self, state: np.ndarray) -> int:
        with torch.no_grad():
            logits, _ = self.policy(torch.as_tensor(state, dtype=torch.float32))
        return int(self.rng.random() < torch.softmax(logits, -1)[1].item())

    def update(self, state: np.ndarray, action: int, reward: float, next_state: np.ndarray, done: bool) -> None:
        logits, values = self.policy(torch.as_tensor(np.stack([state, next_state]), dtype=torch.float32))
        target = reward + (0.0 if done else self.gamma * values[1].detach())
        error = target - values[0]
        loss = -torch.log_softmax(logits[0], -1)[action] * error.detach() + 0.5 * error ** 2
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.updates += 1

    def weights(self) -> torch.Tensor:
        return get_weights(self.policy)


def call_here(method, *args):
    """Run a method in this process: the outline's loop without Ray (on_ray.call_remote is the Ray one)."""
    return method(*args)


def outline_loop(env, agent, call=call_here, episodes: int = 100, max_steps: int | None = None) -> dict:
    """The outline's §5.2 training loop, line for line: per step get_action, env.step, agent.update, each
    through `call(method, *args)`; up to `episodes` episodes (or the episode in which `max_steps` is reached).
    Returns the episode returns, steps, calls made and seconds."""
    returns, steps, calls, start = [], 0, 0, time.perf_counter()
    for _ in range(episodes):
        state, done, total = call(env.reset), False, 0.0
        calls += 1
        while not done:
            action = call(agent.get_action, state)
            next_state, reward, done, _ = call(env.step, action)
            call(agent.update, state, action, reward, next_state, done)
            state, steps, calls, total = next_state, steps + 1, calls + 3, total + reward
        returns.append(total)
        if max_steps is not None and steps >= max_steps:
            break
    return {"returns": returns, "steps": steps, "calls": calls, "seconds": time.perf_counter() - start}


def returns_to_go(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = r_t + gamma r_{t+1} + ... to the end of the episode."""
    out, running = np.empty_like(rewards), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


class Learner:
    """Policy gradient with a value baseline (A2C with Monte-Carlo returns), Adam; one update = one version."""

    def __init__(self, seed: int = 0, hidden: int = 32, lr: float = 0.01, gamma: float = 0.99,
                 entropy: float = 0.01):
        torch.manual_seed(seed)
        self.policy = Policy(hidden)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr)
        self.gamma, self.entropy, self.version = gamma, entropy, 0

    def weights(self) -> torch.Tensor:
        return get_weights(self.policy)

    def update(self, batch: list[Trajectory]) -> float:
        """One gradient step on these episodes; advantages G_t - V(s_t), normalized over the batch."""
        device = next(self.policy.parameters()).device  # the episodes arrive as host arrays
        obs, actions, returns = (torch.from_numpy(np.concatenate(arrays)).to(device) for arrays in (
            [t.obs for t in batch], [t.actions for t in batch], [returns_to_go(t.rewards, self.gamma) for t in batch]))
        logits, values = self.policy(obs)
        logp = torch.log_softmax(logits, -1)
        advantage = returns - values.detach()
        advantage = (advantage - advantage.mean()) / (advantage.std(correction=0) + 1e-8)
        policy_loss = -(logp.gather(1, actions[:, None]).squeeze(1) * advantage).mean()
        value_loss = ((values - returns) ** 2).mean() / returns.var(correction=0).clamp(min=1.0)
        entropy = -(logp.exp() * logp).sum(-1).mean()
        loss = policy_loss + 0.5 * value_loss - self.entropy * entropy
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.version += 1
        return loss.item()

    def step(self, batch: list[Trajectory]) -> tuple[torch.Tensor, int]:
        """Update on `batch`, then hand out what the actors need: (new weights, new version)."""
        self.update(batch)
        return self.weights(), self.version


# -- the record every engine keeps: one row per trajectory the learner received ---------------------------

class TrajectoryLog:
    """Per trajectory: when it arrived, who collected it, its policy version, the learner's, the return."""

    COLUMNS = ("t", "actor", "version", "learner_version", "staleness", "ret", "env_steps", "used")

    def __init__(self, max_steps: int, max_seconds: float):
        self.rows = {c: [] for c in self.COLUMNS}
        self.max_steps, self.max_seconds = max_steps, max_seconds
        self.env_steps, self.start = 0, time.perf_counter()

    def add(self, traj: Trajectory, learner_version: int, used: bool = True) -> None:
        self.env_steps += len(traj)
        row = dict(t=time.perf_counter() - self.start, actor=traj.actor, version=traj.version,
                   learner_version=learner_version, staleness=learner_version - traj.version,
                   ret=float(traj.rewards.sum()), env_steps=self.env_steps, used=used)
        for column, value in row.items():
            self.rows[column].append(value)

    def solved(self) -> bool:
        last = self.rows["ret"][-WINDOW:]
        return len(last) == WINDOW and float(np.mean(last)) >= SOLVED

    def done(self) -> bool:
        """Out of environment steps or seconds, or the average return over WINDOW episodes reached SOLVED."""
        return (self.env_steps >= self.max_steps or time.perf_counter() - self.start >= self.max_seconds
                or self.solved())

    def result(self, engine: str, mode: str, actors: int, updates: int, weights: torch.Tensor) -> dict:
        return {"role": "learner", "engine": engine, "mode": mode, "actors": actors, "episodes": self.rows,
                "env_steps": self.env_steps, "seconds": time.perf_counter() - self.start,
                "updates": updates, "weights": weights.tolist()}


def check_options(mode: str, actors: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if actors < 1:
        raise ValueError(f"actors must be at least 1, got {actors}")


def train_local(actors: int = 1, seed: int = 0, max_steps: int = 20_000, max_seconds: float = 60.0,
                hidden: int = 32, lr: float = 0.01) -> dict:
    """The plain loop: one process steps `actors` environments in turn, one episode each per update.

    It computes exactly what the synchronous actor–learner split computes (same seeds, same batches).
    """
    check_options("sync", actors)
    learner, history = Learner(seed, hidden, lr), TrajectoryLog(max_steps, max_seconds)
    workers = [Actor(k, seed, hidden) for k in range(actors)]
    while not history.done():
        weights = learner.weights()
        batch = [w.rollout(weights, learner.version) for w in workers]
        for traj in batch:
            history.add(traj, learner.version)
        learner.update(batch)
    return history.result("local", "sync", actors, learner.version, learner.weights())


def collection_rate(weights: torch.Tensor, steps: int = 5000, seed: int = 0, hidden: int = 32) -> float:
    """Environment steps per second of the plain loop: one process plays whole episodes with fixed weights."""
    actor, taken, start = Actor(0, seed, hidden), 0, time.perf_counter()
    while taken < steps:
        taken += len(actor.rollout(weights, 0))
    return taken / (time.perf_counter() - start)


# -- torch.distributed: rank 0 is the learner, ranks 1..N are rollout actors ---------------------------

@needs_gloo("the async learner receives from whichever actor sends first (any source), which NCCL cannot")
def train(ctx, mode: str = "sync", seed: int = 0, max_steps: int = 20_000, max_seconds: float = 60.0,
          hidden: int = 32, lr: float = 0.01, max_staleness: int = 8) -> dict:
    """Run under dl.launch. sync: every actor collects one episode with the same weights, the learner
    updates on all of them and broadcasts (staleness 0). async: the learner updates on each episode as
    it arrives and answers its sender with the newest weights; episodes more than `max_staleness`
    versions behind are dropped (their steps still count)."""
    check_options(mode, ctx.world_size - 1)
    torch.set_num_threads(1)
    size = get_weights(Policy(hidden)).numel()
    if ctx.rank == 0:
        learner, history = Learner(seed, hidden, lr), TrajectoryLog(max_steps, max_seconds)
        if mode == "sync":
            sync_learner(ctx, learner, history)
        else:
            async_learner(ctx, learner, history, max_staleness)
        return history.result("torch.distributed", mode, ctx.world_size - 1, learner.version,
                              learner.weights())
    actor = Actor(ctx.rank - 1, seed, hidden)
    actor_loop(ctx, actor, size, mode)
    return {"role": "actor", "rank": ctx.rank, "env_steps": actor.env_steps}


def weights_message(learner: Learner, stop: bool) -> torch.Tensor:
    """[version, stop, weights...]: what the learner sends back."""
    return torch.cat([torch.tensor([learner.version, float(stop)]), learner.weights()])


def send_trajectory(ctx, traj: Trajectory) -> None:
    msg = traj.to_tensor()
    ctx.comm.send(torch.tensor([msg.numel()]), dst=0)
    ctx.comm.send(msg, dst=0)


def recv_trajectory(ctx, src: int | None = None) -> tuple[int, Trajectory]:
    """From `src`, or from whichever actor sends first (None): returns (sender, trajectory)."""
    header = torch.zeros(1, dtype=torch.long)
    sender = dist.recv(header, src=src)
    msg = ctx.comm.recv(torch.empty(int(header)), src=sender)
    return sender, Trajectory.from_tensor(msg)


def log_episode(ctx, history: TrajectoryLog) -> None:
    ctx.log(step=len(history.rows["ret"]), episode_return=history.rows["ret"][-1],
            staleness=history.rows["staleness"][-1], env_steps=history.env_steps)


def sync_learner(ctx, learner: Learner, history: TrajectoryLog) -> None:
    ctx.comm.broadcast(weights_message(learner, stop=False), src=0)
    while True:
        batch = [recv_trajectory(ctx, src)[1] for src in range(1, ctx.world_size)]
        for traj in batch:
            history.add(traj, learner.version)
            log_episode(ctx, history)
        learner.update(batch)
        stop = history.done()
        ctx.comm.broadcast(weights_message(learner, stop), src=0)
        if stop:
            return


def async_learner(ctx, learner: Learner, history: TrajectoryLog, max_staleness: int) -> None:
    for actor in range(1, ctx.world_size):
        ctx.comm.send(weights_message(learner, stop=False), dst=actor)
    running, stop = ctx.world_size - 1, False
    while running:
        sender, traj = recv_trajectory(ctx)
        stop = stop or history.done()  # once done, episodes still in flight are counted, not learned from
        used = not stop and learner.version - traj.version <= max_staleness
        history.add(traj, learner.version, used)
        log_episode(ctx, history)
        if used:
            learner.update([traj])
        ctx.comm.send(weights_message(learner, stop), dst=sender)
        running -= stop


def actor_loop(ctx, actor: Actor, size: int, mode: str) -> None:
    """Receive weights (sync: the learner's broadcast; async: its reply to our last trajectory), play one
    episode with them, send it; until the learner says stop."""
    msg = torch.empty(2 + size)
    while True:
        if mode == "sync":
            ctx.comm.broadcast(msg, src=0)
        else:
            ctx.comm.recv(msg, src=0)
        if msg[1]:
            return
        send_trajectory(ctx, actor.rollout(msg[2:], int(msg[0])))
