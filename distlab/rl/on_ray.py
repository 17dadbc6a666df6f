"""The same actor–learner split on Ray (pip install distlab[ray]): first the seed's step-by-step loop, then the fix.

The seed drives an environment actor and an agent actor from the driver, one `ray.get` per call: two
round trips through Ray per environment step, each far dearer than the step itself. The fix ships
whole trajectories: N rollout actors run full episodes with the current weights (one call per
episode, or per fragment of episodes worth at least `fragment` steps), a learner actor updates and the
driver broadcasts its weights through the object store once per version (ray.put). actor_learner.py
holds the pieces; this file only places them in Ray actors.
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch

from .actor_learner import Actor, Agent, Environment, Learner, OnlineAgent, Trajectory, TrajectoryLog, check_options


def start(num_cpus: int = 2, attempts: int = 2) -> None:
    """A local Ray instance without the dashboard; idempotent. On a busy machine Ray's start-up can lose a
    race (its raylet gives the metrics agent 15 s to come up, then aborts): the next attempt usually wins."""
    for attempt in range(1, attempts + 1):
        if ray.is_initialized():
            return
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level="error")
        except Exception as error:  # Ray raises a bare Exception: "The current node timed out during startup"
            ray.shutdown()
            if attempt == attempts or "timed out during startup" not in str(error):
                raise


def stop() -> None:
    """Shut the local Ray instance down (its worker processes end with it)."""
    ray.shutdown()


RemoteActor = ray.remote(Actor)  # a rollout actor (or, in the seed's loop, just an environment)
RemoteAgent = ray.remote(Agent)  # the seed's agent actor: asked for one action at a time
RemoteEnvironment = ray.remote(Environment)  # the outline's two actors, as it writes them (§5.2)
RemoteOnlineAgent = ray.remote(OnlineAgent)


def wait_started(*actors) -> None:
    """Block until these actors' processes are up, so that their start-up is not timed as the first call."""
    ray.get([actor.__ray_ready__.remote() for actor in actors])


def call_remote(method, *args):
    """One remote call, waited for: `ray.get(actor.method.remote(*args))`, as every line of the outline's loop."""
    return ray.get(method.remote(*args))


@ray.remote
class Pinger:
    """Does nothing: the cost of calling it is Ray's round trip alone."""

    def ping(self) -> None:
        pass


@ray.remote
class RemoteLearner:
    """The learner in a Ray worker; `restart` begins a new run without starting a new process."""

    def restart(self, seed: int, hidden: int, lr: float) -> torch.Tensor:
        self.learner = Learner(seed, hidden, lr)
        return self.learner.weights()

    def step(self, batch: list[Trajectory]) -> tuple[torch.Tensor, int]:
        return self.learner.step(batch)


# -- the seed's loop: one ray.get per environment step ---------------------------------------------------

def per_step_rollout(env, agent, weights: torch.Tensor, seed: int = 0, steps: int = 200) -> dict:
    """Drive `env` and `agent` from here, one remote call each per step, for at least `steps` steps.

    Returns the whole episodes collected (a last unfinished one is dropped from them), the steps taken,
    the ray.get round trips and the seconds.
    """
    ray.get([env.reseed.remote(seed), agent.reseed.remote(seed), agent.set_weights.remote(weights)])
    episodes, round_trips, taken, start = [], 0, 0, time.perf_counter()
    while taken < steps:
        obs, rows, done = ray.get(env.reset.remote()), [], False
        round_trips += 1
        while not done and taken < steps:
            action = ray.get(agent.act.remote(obs))
            next_obs, reward, done = ray.get(env.step.remote(action))
            round_trips, taken = round_trips + 2, taken + 1
            rows.append((obs, action, reward))
            obs = next_obs
        if done:
            episodes.append(Trajectory.from_rows(rows, 0, 0))
    return {"episodes": episodes, "steps": taken, "round_trips": round_trips,
            "seconds": time.perf_counter() - start}


def round_trip_seconds(pinger, calls: int = 100) -> float:
    """Median seconds of one `ray.get(pinger.ping.remote())`: the price of every call in the seed's loop."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        ray.get(pinger.ping.remote())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# -- the fix: whole trajectories, N rollout actors, a learner actor ----------------------------------------

def trajectory_rate(actors: list, weights: torch.Tensor, steps: int = 5000, seed: int = 0,
                    fragment: int = 1) -> float:
    """Environment steps per second of these rollout actors playing whole episodes with fixed weights
    (collection only, as the per-step loop measures it): one remote call per `fragment` steps or more
    (1: per episode)."""
    ray.get([a.reseed.remote(seed) for a in actors])
    shared, taken, start = ray.put(weights), 0, time.perf_counter()
    while taken < steps:
        batches = ray.get([a.rollouts.remote(shared, 0, fragment) for a in actors])
        taken += sum(len(t) for batch in batches for t in batch)
    return taken / (time.perf_counter() - start)


def make_actors(n: int, hidden: int = 32) -> list:
    """N rollout actors (actor ids 0..n-1); reuse them across runs: train() reseeds them."""
    return [RemoteActor.remote(k, 0, hidden) for k in range(n)]


def train(actors: list, learner, mode: str = "async", seed: int = 0, max_steps: int = 20_000,
          max_seconds: float = 60.0, hidden: int = 32, lr: float = 0.01, max_staleness: int = 8,
          fragment: int = 1) -> dict:
    """Train with these rollout actors and learner; each call to an actor returns whole episodes of at least
    `fragment` steps in all (1: one episode). sync: one episode per actor per update, all with the
    same weights (staleness 0); async (IMPALA-like): update on each episode as it arrives and send its
    actor straight back out with the newest weights; episodes over `max_staleness` versions behind are
    dropped (their steps still count). Same semantics as rl.train on torch.distributed ranks."""
    check_options(mode, len(actors))
    weights = ray.get(learner.restart.remote(seed, hidden, lr))
    ray.get([a.reseed.remote(seed) for a in actors])
    history = TrajectoryLog(max_steps, max_seconds)
    if mode == "sync":
        weights, version = sync_loop(actors, learner, history, weights, fragment)
    else:
        weights, version = async_loop(actors, learner, history, weights, max_staleness, fragment)
    return history.result("ray", mode, len(actors), version, weights)


def sync_loop(actors: list, learner, history: TrajectoryLog, weights: torch.Tensor, fragment: int):
    version = 0
    while True:
        shared = ray.put(weights)  # one copy in the object store, read by every actor
        batch = [t for ts in ray.get([a.rollouts.remote(shared, version, fragment) for a in actors]) for t in ts]
        for traj in batch:
            history.add(traj, version)
        weights, version = ray.get(learner.step.remote(batch))
        if history.done():
            return weights, version


def async_loop(actors: list, learner, history: TrajectoryLog, weights: torch.Tensor, max_staleness: int, fragment: int):
    version, stop, shared = 0, False, ray.put(weights)
    in_flight = {a.rollouts.remote(shared, version, fragment): a for a in actors}
    while in_flight:
        (ready,), _ = ray.wait(list(in_flight))
        actor, batch = in_flight.pop(ready), ray.get(ready)
        stop = stop or history.done()
        used = not stop and version - batch[0].version <= max_staleness
        for traj in batch:
            history.add(traj, version, used)
        if used:
            weights, version = ray.get(learner.step.remote(batch))
            shared = ray.put(weights)
        if not stop:
            in_flight[actor.rollouts.remote(shared, version, fragment)] = actor
    return weights, version
