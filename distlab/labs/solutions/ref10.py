"""Lab 10: reference solution."""

from distlab.rl.actor_learner import Trajectory


def rollout_worker(env, agent, weights, version, min_steps, seed):
    """Whole episodes with these weights until at least min_steps steps; only the first reset is seeded."""
    agent.set_weights(weights)
    out, taken = [], 0
    while taken < min_steps:
        obs, _ = env.reset(seed=seed if not out else None)
        rows, done = [], False
        while not done:
            action = agent.act(obs)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            rows.append((obs, action, reward))
            obs, done = next_obs, terminated or truncated
        out.append(Trajectory.from_rows(rows, version, agent.actor))
        taken += len(rows)
    return out
