"""Distributed RL: the pieces against their definitions, the actor–learner split on gloo ranks and on
Ray against the plain loop, every environment step counted, staleness 0 when synchronous and bounded
when not, and the seed's per-step Ray loop against the trajectory design (same transitions, 2 round
trips per step)."""

import numpy as np
import pytest
import ray
import torch

import distlab as dl
from distlab.rl import actor_learner as rl
from distlab.rl import on_ray as rl_ray
from distlab.viz import rl as rlviz


def test_a_trajectory_travels_as_one_message_and_back():
    traj = rl.Actor(actor=2, seed=0).rollout(rl.Learner(seed=0).weights(), version=7)
    back = rl.Trajectory.from_tensor(traj.to_tensor())
    assert (back.version, back.actor, len(back)) == (7, 2, len(traj))
    assert np.array_equal(back.obs, traj.obs) and np.array_equal(back.actions, traj.actions)
    assert np.array_equal(back.rewards, traj.rewards)


def test_a_rollout_fragment_is_whole_episodes_just_past_min_steps():
    batch = rl.Actor(seed=4).rollouts(rl.Learner(seed=0).weights(), version=0, min_steps=300)
    lengths = [len(t) for t in batch]
    assert sum(lengths) >= 300 > sum(lengths[:-1])
    assert all(t.rewards.sum() == len(t) for t in batch)  # CartPole pays 1 per step: a return is a length


def test_returns_to_go_follow_the_definition():
    rewards = np.array([1.0, 2.0, 4.0], dtype=np.float32)
    assert np.allclose(rl.returns_to_go(rewards, 0.5), [1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4])


def test_the_numpy_agent_acts_with_the_learners_policy():
    learner, agent = rl.Learner(seed=3), rl.Agent()
    agent.set_weights(learner.weights())
    obs = np.random.default_rng(0).normal(size=(5, rl.OBS)).astype(np.float32)
    expected = learner.policy.pi(torch.from_numpy(obs)).detach().numpy()
    assert np.allclose([agent.w2 @ np.tanh(agent.w1 @ o + agent.b1) + agent.b2 for o in obs], expected, atol=1e-6)
    sure = torch.zeros_like(learner.weights())
    sure[7 * 32 + 1] = 50.0  # bias of action 1's logit: softmax puts all its mass there
    agent.set_weights(sure)
    assert {agent.act(o) for o in obs} == {1}


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        rl.check_options("hogwild", 1)
    with pytest.raises(ValueError, match="actors must be at least 1"):
        rl.train_local(actors=0)


def assert_every_step_counted(learner: dict, actor_counts: list[int]) -> None:
    """CartPole pays 1 per step, so an episode's return is its length: three independent counts agree."""
    returns = learner["episodes"]["ret"]
    assert learner["env_steps"] == sum(returns) == sum(actor_counts)
    assert learner["episodes"]["env_steps"] == np.cumsum(returns).tolist()


@pytest.mark.timeout(180)
def test_one_synchronous_actor_computes_the_plain_loop_and_learns_cartpole():
    """Seeded: the split over two gloo ranks = the single-process loop, staleness 0, return well above chance."""
    local = rl.train_local(actors=1, seed=0, max_steps=10_000, max_seconds=600)
    run = dl.launch(rl.train, world_size=2, timeout=150, mode="sync", seed=0, max_steps=10_000, max_seconds=600)
    learner, actor = run.results
    assert learner["episodes"]["ret"] == local["episodes"]["ret"]
    assert np.allclose(learner["weights"], local["weights"], atol=1e-6)
    assert set(learner["episodes"]["staleness"]) == {0}
    assert learner["updates"] == len(learner["episodes"]["ret"])  # one episode per update
    assert_every_step_counted(learner, [actor["env_steps"]])
    assert np.mean(learner["episodes"]["ret"][-20:]) >= 100  # a random policy averages about 22
    sent = run.comm[(run.comm["op"] == "send") & (run.comm["rank"] == 1)]["bytes"]
    assert sent.sum() == sum(4 * (3 + 6 * n) + 8 for n in learner["episodes"]["ret"])  # header + message


@pytest.mark.timeout(180)
def test_synchronous_actors_share_each_version_and_async_staleness_stays_bounded():
    sync = dl.launch(rl.train, world_size=3, timeout=150, mode="sync", seed=1, max_steps=3000, max_seconds=600)
    learner = sync.results[0]
    eps = learner["episodes"]
    assert set(eps["staleness"]) == {0}
    assert eps["actor"] == [0, 1] * learner["updates"]  # every update: one episode from each actor
    assert_every_step_counted(learner, [r["env_steps"] for r in sync.results[1:]])

    run = dl.launch(rl.train, world_size=3, timeout=150, mode="async", seed=1, max_steps=3000,
                    max_seconds=600, max_staleness=1)
    learner = run.results[0]
    eps = learner["episodes"]
    assert_every_step_counted(learner, [r["env_steps"] for r in run.results[1:]])
    used = [s for s, u in zip(eps["staleness"], eps["used"]) if u]
    assert max(used) <= 1 and learner["updates"] == len(used)  # stale ones dropped, never learned from
    assert max(eps["staleness"]) >= 1  # two actors, one learner: someone's policy is behind


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for this module: 2 rollout actors, a learner, the seed's agent, a pinger."""
    rl_ray.start(num_cpus=2)
    handles = {"actors": rl_ray.make_actors(2), "learner": rl_ray.RemoteLearner.remote(),
               "agent": rl_ray.RemoteAgent.remote(), "pinger": rl_ray.Pinger.remote()}
    yield handles
    ray.shutdown()


@pytest.mark.timeout(240)
def test_the_seed_loop_and_the_trajectory_design_make_the_same_transitions(cluster):
    env, agent, actor = cluster["actors"][0], cluster["agent"], cluster["actors"][0]
    weights = rl.Learner(seed=3).weights()  # fixed: nobody learns here
    seed_loop = rl_ray.per_step_rollout(env, agent, weights, seed=7, steps=300)
    episodes = seed_loop["episodes"]
    resets = len(episodes) + (sum(len(e) for e in episodes) < seed_loop["steps"])  # an unfinished last one
    assert seed_loop["round_trips"] == 2 * seed_loop["steps"] + resets  # act + step per step, one per reset
    ray.get(actor.reseed.remote(7))
    whole = [ray.get(actor.rollout.remote(weights, 0)) for _ in episodes]  # one call per episode
    local = rl.Actor(0, seed=7)
    for a, b, c in zip(episodes, whole, [local.rollout(weights, 0) for _ in episodes]):
        for field in ("obs", "actions", "rewards"):
            assert np.array_equal(getattr(a, field), getattr(b, field))
            assert np.array_equal(getattr(a, field), getattr(c, field))


@pytest.mark.timeout(240)
def test_one_synchronous_ray_actor_computes_the_plain_loop(cluster):
    local = rl.train_local(actors=1, seed=0, max_steps=3000, max_seconds=600)
    out = rl_ray.train(cluster["actors"][:1], cluster["learner"], "sync", seed=0, max_steps=3000, max_seconds=600)
    assert out["episodes"]["ret"] == local["episodes"]["ret"]
    assert np.allclose(out["weights"], local["weights"], atol=1e-6)
    assert set(out["episodes"]["staleness"]) == {0}


@pytest.mark.timeout(240)
def test_ray_async_actors_count_every_step_and_bound_staleness(cluster):
    actors = cluster["actors"]
    out = rl_ray.train(actors, cluster["learner"], "async", seed=1, max_steps=3000, max_seconds=600,
                       max_staleness=1)
    assert_every_step_counted(out, ray.get([a.steps_taken.remote() for a in actors]))
    used = [s for s, u in zip(out["episodes"]["staleness"], out["episodes"]["used"]) if u]
    assert max(used) <= 1 and out["updates"] == len(used)


@pytest.mark.timeout(240)
def test_whole_trajectories_beat_one_round_trip_per_step(cluster):
    """Timing with a wide margin: the per-step loop pays two Ray round trips per step, the design one per episode."""
    weights = rl.Learner(seed=0).weights()
    seed_loop = rl_ray.per_step_rollout(cluster["actors"][0], cluster["agent"], weights, seed=0, steps=300)
    out = rl_ray.train(cluster["actors"], cluster["learner"], "async", seed=0, max_steps=3000, max_seconds=600)
    per_step_rate = seed_loop["steps"] / seed_loop["seconds"]
    assert out["env_steps"] / out["seconds"] > 3 * per_step_rate
    round_trip = rl_ray.round_trip_seconds(cluster["pinger"], calls=20)
    assert seed_loop["seconds"] / seed_loop["steps"] > round_trip  # two round trips per step, and the work


def test_summary_finds_the_step_where_the_100_episode_average_first_reaches_195():
    """50 episodes of 10 steps, then 200-step ones: the last 100 first average 195 when 98 of them are 200 long
    (98 * 200 + 2 * 10 = 19,620 >= 19,500, while 97 give 19,430)."""
    returns = [10.0] * 50 + [200.0] * 100
    steps = np.cumsum(returns).tolist()
    result = {"engine": "local", "mode": "sync", "actors": 1, "env_steps": steps[-1], "seconds": 1.0, "updates": 150,
              "episodes": {"t": [0.0] * 150, "actor": [0] * 150, "version": list(range(150)),
                           "learner_version": list(range(150)), "staleness": [0] * 150, "ret": returns,
                           "env_steps": steps, "used": [True] * 150}}
    row = rlviz.summary({"run": result}).loc["run"]
    assert row["solved_at_step"] == steps[50 + 98 - 1] and row["steps_per_s"] == steps[-1]
    assert row["last_100_return"] == 200.0 and row["max_staleness"] == 0


def test_the_outline_loop_makes_three_calls_per_step_and_learns_after_every_one():
    agent = rl.OnlineAgent(seed=0)
    start = agent.weights()
    out = rl.outline_loop(rl.Environment(seed=0), agent, rl.call_here, episodes=5)
    assert len(out["returns"]) == 5 and out["steps"] == sum(out["returns"])  # CartPole pays 1 per step
    assert out["calls"] == 3 * out["steps"] + 5  # get_action, step, update per step; a reset per episode
    assert agent.updates == out["steps"]
    assert (agent.weights() - start).abs().max() > 0
    again = rl.OnlineAgent(seed=0)
    assert rl.outline_loop(rl.Environment(seed=0), again, rl.call_here, episodes=5)["returns"] == out["returns"]
    assert torch.equal(again.weights(), agent.weights())


def test_the_online_update_is_one_step_actor_critic():
    """One update against its formula: loss = −log π(a|s)·δ + δ²/2 with δ = r + γV(s′) − V(s), one Adam step."""
    agent, twin = rl.OnlineAgent(seed=2), rl.Policy()
    twin.load_state_dict(agent.policy.state_dict())
    opt = torch.optim.Adam(twin.parameters(), lr=0.005)
    s, s2 = np.array([0.1, -0.2, 0.03, 0.4], np.float32), np.array([0.12, 0.1, 0.0, 0.2], np.float32)
    logits, v = twin(torch.from_numpy(s))
    _, v2 = twin(torch.from_numpy(s2))
    delta = 1.0 + 0.99 * v2.detach() - v
    (-torch.log_softmax(logits, -1)[1] * delta.detach() + 0.5 * delta ** 2).backward()
    opt.step()
    agent.update(s, 1, 1.0, s2, False)
    assert torch.allclose(agent.weights(), rl.get_weights(twin), atol=1e-7)


@pytest.mark.timeout(240)
def test_the_outline_loop_on_ray_computes_what_one_process_computes(cluster):
    env, agent = rl_ray.RemoteEnvironment.remote(3), rl_ray.RemoteOnlineAgent.remote(3)
    remote = rl.outline_loop(env, agent, rl_ray.call_remote, episodes=6)
    here_agent = rl.OnlineAgent(3)
    here = rl.outline_loop(rl.Environment(3), here_agent, rl.call_here, episodes=6)
    assert remote["returns"] == here["returns"] and remote["calls"] == here["calls"]
    assert torch.allclose(rl_ray.call_remote(agent.weights), here_agent.weights(), atol=1e-6)
    assert ray.get(agent.update.remote(np.zeros(4, np.float32), 0, 1.0, np.zeros(4, np.float32), True)) is None
