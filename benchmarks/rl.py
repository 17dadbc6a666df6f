"""Distributed RL on CartPole: environment steps per second of the seed's per-step `ray.get` loop, the
trajectory design on Ray and on torch.distributed ranks (1, 2, 4 rollout actors), and a plain loop.

    python benchmarks/rl.py            # 10 s per training run
    python benchmarks/rl.py --quick    # 3 s per training run

Collection rows play episodes with a fixed, untrained policy (the per-step loop's setting; its episodes last
about 20 steps, so one call per episode still pays a round trip per 20 steps, and a call per >= 1000 steps, as
RLlib's rollout fragments do, pays it once); training rows run the async actor-learner loop (rl.train /
rl_ray.train, one episode per call) for a fixed time and count every environment step.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import ray

import distlab as dl
from distlab.rl import actor_learner as rl
from distlab.rl import on_ray as rl_ray


def row(design: str, engine: str, actors: int | str, rate: float, per_step: float, ret: str = "") -> str:
    return f"| {design} | {engine} | {actors} | {rate:,.0f} | {rate / per_step:,.1f}× | {ret} |"


def last_100(result: dict) -> str:
    return f"{np.mean(result['episodes']['ret'][-100:]):.0f}"


def main(quick: bool) -> None:
    seconds, steps = (3, 2000) if quick else (10, 10_000)
    weights = rl.Learner(seed=0).weights()
    rl_ray.start(num_cpus=2)
    env, agent = rl_ray.RemoteActor.remote(), rl_ray.RemoteAgent.remote()
    seed_loop = rl_ray.per_step_rollout(env, agent, weights, steps=steps // 5)
    per_step = seed_loop["steps"] / seed_loop["seconds"]
    round_trip = rl_ray.round_trip_seconds(rl_ray.Pinger.remote())
    actors, learner = rl_ray.make_actors(4), rl_ray.RemoteLearner.remote()
    lines = [row("plain loop, one process (collection)", "none", 1, rl.collection_rate(weights, 5 * steps), per_step),
             row("per-step ray.get loop (collection)", "Ray", 1, per_step, per_step)]
    for fragment, design in ((1, "whole episodes, one per call (collection)"),
                             (1000, "whole episodes, >= 1000 steps per call (collection)")):
        for n in (1, 2, 4):
            rate = rl_ray.trajectory_rate(actors[:n], weights, 5 * steps, fragment=fragment)
            lines.append(row(design, "Ray", n, rate, per_step))
    local = rl.train_local(1, seed=0, max_steps=10**7, max_seconds=seconds)
    lines.append(row("plain loop, one process (training)", "none", 1, local["env_steps"] / local["seconds"],
                     per_step, last_100(local)))
    for n in (1, 2, 4):
        out = rl_ray.train(actors[:n], learner, "async", seed=0, max_steps=10**7, max_seconds=seconds)
        lines.append(row("actors + learner, async (training)", "Ray", n, out["env_steps"] / out["seconds"],
                         per_step, last_100(out)))
    ray.shutdown()
    for n in (1, 2, 4):
        dl.launch(rl.train, world_size=n + 1, mode="async", max_steps=100, timeout=300)  # start the ranks
        out = dl.launch(rl.train, world_size=n + 1, mode="async", seed=0, max_steps=10**7, max_seconds=seconds,
                        timeout=300).results[0]
        lines.append(row("actors + learner, async (training)", "torch.distributed", n,
                         out["env_steps"] / out["seconds"], per_step, last_100(out)))
    dl.shutdown()
    print(f"\nCartPole-v1, policy MLP 4-32-2 (+ value 4-32-1), {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; training runs stop after {seconds} s or once solved (195 over 100 episodes)")
    print(f"one Ray round trip: {1e3 * round_trip:.2f} ms; the per-step loop makes "
          f"{seed_loop['round_trips'] / seed_loop['steps']:.2f} per step")
    print("| design | engine | actors | env steps/s | vs per-step loop | last-100 return |")
    print("|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per training run instead of 10")
    main(parser.parse_args().quick)
