"""Federated learning engines side by side: the vectorized simulation, the one-client-after-another
loop, and real processes (a server rank and client ranks).

    python benchmarks/federated.py            # Synthetic(1,1), 1000 clients, 50 rounds, 2 repeats (a few minutes)
    python benchmarks/federated.py --rounds 5 # quicker look

Table 1: FedAvg on Synthetic(1,1), 1000 clients, C = 0.1, E = 1, B = 10, softmax regression, client
lr 0.01 (the FedProx paper's setting): wall time and final test accuracy of each engine, same seed,
one torch thread.
Table 2: a small config (digits, 12 clients, C = 1, E = 1, B = 10, 5 rounds) on 4 ranks against the
two in-process engines: what the processes cost.
"""

from __future__ import annotations

import argparse
import time

import torch

import distlab as dl
from distlab.architectures.federated import partition as fd
from distlab.architectures.federated.processes import train_federated
from distlab.architectures.federated.simulation import Config, largest_difference, simulate


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def synthetic_table(rounds: int, repeats: int) -> None:
    fed = fd.synthetic(1.0, 1.0, num_clients=1000, seed=0)
    config = Config(model=(60, 10), rounds=rounds, fraction=0.1, epochs=1, batch_size=10, lr=0.01)
    sizes = torch.tensor(fed.sizes, dtype=torch.float)
    print(f"\nSynthetic(1,1): 1000 clients, {int(sizes.sum())} training examples, client sizes "
          f"min {int(sizes.min())} / median {int(sizes.median())} / max {int(sizes.max())}; "
          f"C=0.1, E=1, B=10, lr=0.01, {rounds} rounds, torch threads {torch.get_num_threads()}; "
          f"engines alternate, best of {repeats}")
    times: dict[str, list[float]] = {"loop": [], "vmap": [], "vectorized": []}
    runs = {}
    for _ in range(repeats):  # alternating, so both engines see the same background load
        for engine in times:
            out, seconds = timed(lambda e=engine: simulate(fed, config, e))
            times[engine].append(seconds)
            runs[engine] = out
    names = {"loop": "loop (one client after another)", "vmap": "vmap(functional_call) over stacked clients",
             "vectorized": "vectorized (batched matrix products)"}
    print("| engine | wall s (best) | all runs s | test accuracy | speed-up |")
    print("|---|---|---|---|---|")
    for engine, name in names.items():
        best = min(times[engine])
        print(f"| {name} | {best:.1f} | {_list(times[engine])} | {runs[engine].accuracy:.3f} | "
              f"{min(times['loop']) / best:.1f}× |")
    gap = largest_difference(runs["vectorized"].params, runs["loop"].params)
    print(f"largest parameter difference between the vectorized and loop final models: {gap:.2e}")


def _list(values: list[float]) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


def ranks_table() -> None:
    fed = fd.digits(12, "iid")
    config = Config(rounds=5, fraction=1.0, epochs=1, batch_size=10, lr=0.1)
    dl.launch(train_federated, world_size=4, fed=fed, config=Config(rounds=1), timeout=300)  # start the ranks
    run, t_ranks = timed(lambda: dl.launch(train_federated, world_size=4, fed=fed, config=config, timeout=300))
    loop, t_loop = timed(lambda: simulate(fed, config, "loop"))
    vectorized, t_vec = timed(lambda: simulate(fed, config, "vectorized"))
    sent = run.comm[run.comm["op"] == "send"]["bytes"].sum()
    gap = largest_difference(run.results[0], vectorized.params)
    print("\nDigits, 12 clients, C=1, E=1, B=10, lr=0.1, 5 rounds (ranks already warm)")
    print("| engine | wall s | test accuracy |")
    print("|---|---|---|")
    print(f"| 4 ranks: server + 3 client ranks (gloo) | {t_ranks:.2f} "
          f"| {run.metrics['accuracy'].dropna().iloc[-1]:.3f} |")
    print(f"| loop, one process | {t_loop:.2f} | {loop.accuracy:.3f} |")
    print(f"| vectorized, one process | {t_vec:.2f} | {vectorized.accuracy:.3f} |")
    print(f"client ranks sent {sent / 1e6:.2f} MB of updates ({sent // (12 * 5)} bytes per client per round); "
          f"largest parameter difference ranks vs vectorized: {gap:.2e}")


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (the ranks get one each too)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    synthetic_table(args.rounds, args.repeats)
    ranks_table()
    dl.shutdown()
