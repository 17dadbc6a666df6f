"""Lab 10: typical wrong answers get the diagnosis that names their mistake (the reference solution passes
in test_labs.py)."""

import pytest

from distlab.labs import grading
from distlab.rl.actor_learner import Trajectory


def _worker(episode, version_of=lambda version: version, seed_every_reset=False, seeded=True, extra_episode=False):
    """A rollout worker built from `episode(env, agent, obs) -> rows`, with one knob per typical slip."""
    def worker(env, agent, weights, version, min_steps, seed):
        agent.set_weights(weights)
        out, taken = [], 0
        while taken < min_steps or extra_episode and len(out) and taken - len(out[-1]) < min_steps:
            first = not out or seed_every_reset
            obs, _ = env.reset(seed=seed if first and seeded else None)
            rows = episode(env, agent, obs)
            out.append(Trajectory.from_rows(rows, version_of(version), agent.actor))
            taken += len(rows)
        return out
    return worker


def whole_episode(env, agent, obs, stop=lambda terminated, truncated: terminated or truncated):
    rows, done = [], False
    while not done:
        action = agent.act(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows.append((obs, action, reward))
        obs, done = next_obs, stop(terminated, truncated)
    return rows


def last_step_dropped(env, agent, obs):
    """Leaves the loop on the final step before recording it."""
    rows = []
    while True:
        action = agent.act(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            return rows
        rows.append((obs, action, reward))
        obs = next_obs


def reward_of_the_step_before(env, agent, obs):
    """Each transition gets the previous step's reward (0 for the first): the return is one short."""
    rows, done, previous = [], False, 0.0
    while not done:
        action = agent.act(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows.append((obs, action, previous))
        obs, done, previous = next_obs, terminated or truncated, reward
    return rows


def observation_after_the_step(env, agent, obs):
    rows, done = [], False
    while not done:
        action = agent.act(obs)
        obs, reward, terminated, truncated, _ = env.step(action)
        rows.append((obs, action, reward))
        done = terminated or truncated
    return rows


def cut_at_the_budget(env, agent, weights, version, min_steps, seed):
    """Counts steps, not episodes: the last episode is cut off when the budget runs out."""
    agent.set_weights(weights)
    out, rows, taken = [], [], 0
    obs, _ = env.reset(seed=seed)
    while taken < min_steps:
        action = agent.act(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows.append((obs, action, reward))
        taken += 1
        obs = next_obs
        if terminated or truncated:
            out.append(Trajectory.from_rows(rows, version, agent.actor))
            rows = []
            obs, _ = env.reset()
    return out + [Trajectory.from_rows(rows, version, agent.actor)] if rows else out


@pytest.mark.parametrize("solution, says", [
    pytest.param(cut_at_the_budget, "it was cut at the step budget", id="cut at the budget"),
    pytest.param(_worker(last_step_dropped), "the step that ended the episode (and its reward) is missing",
                 id="last step dropped"),
    pytest.param(_worker(reward_of_the_step_before), "— off by one", id="reward off by one"),
    pytest.param(_worker(whole_episode, version_of=lambda version: 0),
                 "carries version 0, but these weights are version 7", id="version missing"),
    pytest.param(_worker(lambda env, agent, obs: whole_episode(env, agent, obs, stop=lambda term, trunc: term)),
                 "after env.step returned truncated=True", id="truncation ignored"),
    pytest.param(_worker(whole_episode, seed_every_reset=True), "every seeded episode starts from the same state",
                 id="every reset seeded"),
    pytest.param(_worker(whole_episode, seeded=False), "the first env.reset had no seed", id="never seeded"),
    pytest.param(_worker(observation_after_the_step), "the observation after the step", id="next observation"),
    pytest.param(_worker(whole_episode, extra_episode=True), "before the last episode", id="one episode too many"),
])
def test_a_wrong_rollout_worker_gets_its_diagnosis(solution, says):
    verdict = grading.grade("10.rollout_worker", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)
