"""Lab 10 · Distributed RL: a rollout worker that returns whole CartPole episodes.

Graded in-process (a rollout worker is one process; the notebook's actors run many of them): the
student's worker plays CartPole with given policy weights through an environment that records every
reset and step, so the check can say whether each trajectory is one whole episode (it ended in
terminated or truncated — a short time limit makes both happen), whether lengths and returns agree
with what the environment paid out, whether the policy version and actor id are carried, whether the
call stops at the first episode that brings it to `min_steps`, and whether the same seed gives the
same episodes: those of distlab's own `rl.Actor.rollouts`, transition by transition.
"""

from __future__ import annotations

import time
import warnings

import gymnasium as gym
import numpy as np
import torch

from ..rl.actor_learner import Actor, Agent, Policy, Trajectory, get_weights
from .grading import Passed, Wrong, call_student, exercise

ACTOR, SEED, VERSION, MIN_STEPS, TIME_LIMIT = 2, 10, 7, 100, 20  # a short time limit: some episodes are truncated


class RecordedEnv(gym.Wrapper):
    """CartPole as the student sees it; every episode's steps, return, end and seeding are recorded."""

    def __init__(self):
        super().__init__(gym.make("CartPole-v1", max_episode_steps=TIME_LIMIT))
        self.episodes: list[dict] = []

    def reset(self, **kwargs):
        self.episodes.append({"steps": 0, "return": 0.0, "ended": None, "after_end": 0, "seed": kwargs.get("seed")})
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        episode = self.episodes[-1]
        episode["after_end"] += episode["ended"] is not None
        episode["steps"] += 1
        episode["return"] += float(reward)
        if episode["ended"] is None and (terminated or truncated):
            episode["ended"] = "terminated" if terminated else "truncated"
        return obs, reward, terminated, truncated, info


def policy_weights() -> torch.Tensor:
    """An untrained policy (Learner(seed=0)'s): short episodes, some reach the time limit. Torch's global
    random stream is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return get_weights(Policy())


def _play(fn) -> tuple[list, list[dict], float]:
    """The student's worker on a fresh recorded environment and agent: (trajectories, episodes, seconds)."""
    env, agent, weights = RecordedEnv(), Agent(ACTOR, SEED), policy_weights()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gymnasium warns on a step after the end; the check says so itself
        out = call_student(fn, env, agent, weights, VERSION, MIN_STEPS, SEED + 1000 * ACTOR)
    return out, [e for e in env.episodes if e["steps"]], time.perf_counter() - start  # resets never stepped: none


def library_rollouts() -> tuple[list[Trajectory], float]:
    """distlab's Actor.rollouts with the same seeds, weights and time limit: what the worker must return."""
    actor = Actor(ACTOR, SEED)
    actor.env = gym.make("CartPole-v1", max_episode_steps=TIME_LIMIT)
    actor.reseed(SEED)
    weights, start = policy_weights(), time.perf_counter()
    out = actor.rollouts(weights, VERSION, MIN_STEPS)
    return out, time.perf_counter() - start


def _explain_shape(out) -> None:
    if not isinstance(out, list) or not out:
        raise Wrong(f"return a list of trajectories (rl.Trajectory, one per episode), got {type(out).__name__}"
                    + (" (empty)" if isinstance(out, list) else ""))
    for k, traj in enumerate(out):
        if not isinstance(traj, Trajectory):
            raise Wrong(f"item {k} is a {type(traj).__name__}: build each episode with "
                        "rl.Trajectory.from_rows(rows, version, actor), rows = [(obs, action, reward), ...]")
        if traj.version != VERSION:
            raise Wrong(f"trajectory {k} carries version {traj.version!r}, but these weights are version {VERSION}: "
                        "pass the version on (the learner subtracts it from its own to measure staleness)")
        if traj.actor != ACTOR:
            raise Wrong(f"trajectory {k} says actor {traj.actor!r}; this worker is actor {ACTOR} (agent.actor)")
        sizes = {len(traj.obs), len(traj.actions), len(traj.rewards)}
        if len(sizes) != 1:
            raise Wrong(f"trajectory {k} has {len(traj.obs)} observations, {len(traj.actions)} actions and "
                        f"{len(traj.rewards)} rewards: one of each per step")


def _explain_episodes(out: list[Trajectory], episodes: list[dict]) -> None:
    """Each trajectory against the episode the environment recorded."""
    if len(episodes) != len(out):
        raise Wrong(f"you reset the environment {len(episodes)} times but returned {len(out)} trajectories: one "
                    "trajectory per episode played")
    for k, (traj, episode) in enumerate(zip(out, episodes)):
        steps, ended = episode["steps"], episode["ended"]
        if episode["after_end"]:
            raise Wrong(f"episode {k} went on for {episode['after_end']} step(s) after env.step returned {ended}=True: "
                        "an episode ends on terminated (the pole fell) or truncated (the time limit, here "
                        f"{TIME_LIMIT} steps)")
        if ended is None:
            raise Wrong(f"episode {k} stopped after {steps} steps, neither terminated nor truncated: it was cut at the "
                        "step budget. Finish every episode you start, and check min_steps between episodes")
        if len(traj) != steps:
            off = (": the step that ended the episode (and its reward) is missing — record the transition before "
                   "you leave the loop" if len(traj) == steps - 1 else "")
            raise Wrong(f"trajectory {k} has {len(traj)} transitions but its episode took {steps} steps{off}")
        ret = float(np.sum(traj.rewards))
        if ret != episode["return"]:
            off = " — off by one" if abs(ret - episode["return"]) == 1 else ""
            raise Wrong(f"trajectory {k}'s rewards add up to {ret:g}, but the environment paid {episode['return']:g} "
                        f"over that episode{off}: keep the reward each env.step returned, one per step")


def _explain_budget(out: list[Trajectory]) -> None:
    total = sum(len(t) for t in out)
    if total < MIN_STEPS:
        raise Wrong(f"{total} steps in all, fewer than min_steps = {MIN_STEPS}: play whole episodes until at least "
                    "min_steps steps (RLlib's rollout fragment)")
    if total - len(out[-1]) >= MIN_STEPS:
        raise Wrong(f"you already had {total - len(out[-1])} ≥ min_steps = {MIN_STEPS} steps before the last episode: "
                    "stop as soon as the total reaches min_steps, or the learner waits for an episode it did not "
                    "ask for")


def _same(a: list[Trajectory], b: list[Trajectory]) -> bool:
    return len(a) == len(b) and all(len(x) == len(y) and np.array_equal(x.obs, y.obs) and np.array_equal(
        x.actions, y.actions) and np.array_equal(x.rewards, y.rewards) for x, y in zip(a, b))


def _explain_seeding(out: list[Trajectory], episodes: list[dict], again: list[Trajectory]) -> None:
    seeded = [k for k, e in enumerate(episodes) if e["seed"] is not None]
    if seeded[:1] != [0]:
        raise Wrong("the first env.reset had no seed: reset with env.reset(seed=seed) for the first episode, so the "
                    "same seed gives the same episodes (a test, a replay, a bug report all need that)")
    if len(seeded) > 1:
        raise Wrong(f"you seeded env.reset for episodes {seeded}: every seeded episode starts from the same state. "
                    "Seed only the first reset; the next ones continue the environment's random stream")
    if not _same(out, again):
        raise Wrong("two calls with the same seed and weights gave different episodes: seed the first reset only, "
                    "and draw every action from agent.act(obs) (its random stream is seeded)")


def _explain_transitions(out: list[Trajectory], expected: list[Trajectory]) -> None:
    for k, (traj, lib) in enumerate(zip(out, expected)):
        if len(traj) > 1 and np.array_equal(traj.obs[:-1], lib.obs[1:len(traj)]):
            raise Wrong(f"trajectory {k} stores, at step t, the observation after the step: keep the one the action "
                        "was chosen from (obs before env.step), so that the learner can score π(a | s)")
        for t in range(min(len(traj), len(lib))):
            for field in ("obs", "actions", "rewards"):
                if not np.array_equal(getattr(traj, field)[t], getattr(lib, field)[t]):
                    raise Wrong(f"episode {k}, step {t}: your {field} {getattr(traj, field)[t]} differ from distlab's "
                                f"rl.Actor.rollouts ({getattr(lib, field)[t]}) with the same seeds and weights")
    if not _same(out, expected):
        raise Wrong(f"your episodes last {[len(t) for t in out]} steps, rl.Actor.rollouts' {[len(t) for t in expected]}"
                    " with the same seeds and weights")


@exercise("10.rollout_worker", "A rollout worker that returns whole trajectories")
def rollout_worker(fn) -> Passed:
    out, episodes, seconds = _play(fn)
    _explain_shape(out)
    _explain_episodes(out, episodes)
    _explain_budget(out)
    again, _, _ = _play(fn)
    _explain_seeding(out, episodes, again)
    expected, library_seconds = library_rollouts()
    _explain_transitions(out, expected)
    steps = sum(len(t) for t in out)
    ends = [e["ended"] for e in episodes]
    return Passed(f"{len(out)} whole episodes ({ends.count('terminated')} terminated, {ends.count('truncated')} "
                  f"truncated at {TIME_LIMIT} steps), {steps} ≥ min_steps = {MIN_STEPS} steps, version and actor "
                  "carried; the same seed gives rl.Actor.rollouts' episodes, transition by transition",
                  {"environment steps per second": f"yours {steps / seconds:,.0f}, rl.Actor.rollouts "
                                                   f"{steps / library_seconds:,.0f}"})
