"""Choosing an architecture (the seed's FAQ): one task trained six ways, measured side by side.

The task is fixed: the digits MLP 64-32-10 from the same start, the same 1,438 training examples, the
same learning rate and per-rank batch, and the same number of examples processed in all (`epochs`
passes over the training set, summed over ranks). Each architecture runs on `world_size` ranks through
its own module's entry point, and its row reads that module's own accounting:

- all-reduce data parallel, gossip D-PSGD on a ring and on the full graph: `gossip.train`; gossip's
  bytes are the sends the run's comm table counted (one payload per neighbour per mixing step), the
  all-reduce's the ring model's 2(N-1)/N of the payload (gloo's own transfers are not observable);
- parameter server, sync (BSP) and async (ASP), rank 0 serving, the others working:
  `parameter_server.train`, the server's `bytes_in` (what each worker sent) and `bytes_out`;
- federated averaging, rank 0 aggregating, one client per other rank, one local epoch per round:
  `federated_ranks.train_federated`, the run's comm table (a broadcast of S bytes counts as (N-1)·S
  sent by the server: what the clients receive).

A launch may run on another world size than `task.world_size` asks (a student's first experiment): the
rank functions below take their plan from the size they got, and the rows read it from the run.
Ranks run only these functions from here; pandas is imported by `compare` alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .. import data, models
from ..communication.cost import ring_allreduce_bytes
from ..launch import launch
from ..ranks import needs_gloo, world_sizes
from . import gossip
from . import parameter_server as ps
from .federated import partition as federated_data
from .federated import processes as federated_ranks
from .federated import simulation as federated_sim

ARCHITECTURES = ("all-reduce", "PS sync", "PS async", "gossip ring", "gossip full", "FedAvg")
with torch.device("meta"):  # shapes only: no memory, and no draw from torch's random stream at import
    PARAMETERS = models.parameter_count(models.mlp(64, 32, 10))  # the MLP 64-32-10
PAYLOAD = 4 * PARAMETERS  # bytes of one float32 copy of the model


@dataclass(frozen=True)
class Task:
    """What every architecture is asked to do: `epochs` passes over the digits, `batch` examples per
    gradient on one rank (worker, client), one learning rate, on `world_size` ranks."""

    epochs: int = 5
    batch: int = 32
    lr: float = 0.5
    world_size: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError(f"epochs, batch and lr must be positive, got epochs={self.epochs}, "
                             f"batch={self.batch}, lr={self.lr}")
        if self.world_size < 3:
            raise ValueError(f"world_size must be >= 3 (a server and two workers; a ring of 3), got {self.world_size}")


def train_examples(seed: int = 0) -> int:
    return len(data.digits(seed=seed)[1])


def plan(task: Task, examples: int | None = None) -> dict[str, int]:
    """Steps per rank (all-reduce, gossip), per worker (parameter server) and rounds (FedAvg) that
    process `task.epochs` x `examples` examples, to the nearest whole step."""
    examples = train_examples(task.seed) if examples is None else examples
    samples = task.epochs * examples
    return {"samples": samples,
            "steps": max(1, round(samples / (task.world_size * task.batch))),
            "worker_steps": max(1, round(samples / ((task.world_size - 1) * task.batch))),
            "rounds": task.epochs}


THREE = "the comparison needs a server and two workers (and a ring of 3)"


def sized(task: Task, world_size: int) -> Task:
    """The task on the world size a launch actually got."""
    return replace(task, world_size=world_size)


def warm_up(ctx) -> None:
    """Load the data and take one client step (torch.optim's first step imports a lot), so that no
    row pays for first-time imports."""
    x, y, x_test, y_test = data.digits(ctx.rank, ctx.world_size)
    config = federated_sim.Config(batch_size=8)
    params = federated_sim.initial_params(config)
    federated_sim.train_client(params, x, y, torch.arange(8).view(1, 8), config)
    federated_sim.evaluate(params, x_test, y_test)


# -- one row per architecture, each read from its own module's accounting ------------------------------

@world_sizes(lambda n, **_: n >= 3, THREE)
def gossip_ranks(ctx, task: Task, algorithm: str, topology: str) -> dict:
    """gossip.train for the steps of this launch's world size."""
    steps = plan(sized(task, ctx.world_size))["steps"]
    return gossip.train(ctx, algorithm=algorithm, topology=topology, steps=steps, lr=task.lr, batch=task.batch,
                        eval_every=steps, seed=task.seed)


@world_sizes(lambda n, **_: n >= 3, THREE)
@needs_gloo(ps.ANY_SOURCE)
def parameter_server_ranks(ctx, task: Task, mode: str, straggler_delay: float = 0.0) -> dict:
    """ps.train for the worker steps of this launch's world size; the last worker sleeps straggler_delay s a step."""
    slow = {"slow_rank": ctx.world_size - 1, "delay": straggler_delay} if straggler_delay else {}
    return ps.train(ctx, mode=mode, steps=plan(sized(task, ctx.world_size))["worker_steps"], batch=task.batch,
                    lr=task.lr, seed=task.seed, **slow)


@world_sizes(lambda n, **_: n >= 3, THREE)
def federated_ranks_of(ctx, task: Task):
    """train_federated with one client per client rank of this launch."""
    return federated_ranks.train_federated(ctx, *federation(sized(task, ctx.world_size)))


def _row(name: str, run, samples: int, updates: int, syncs: float, bytes_by_rank: list[int], accuracy: float,
         drift: float = math.nan, staleness: float = math.nan) -> dict:
    return {"architecture": name, "world_size": run.world_size, "wall_s": run.config["seconds"], "samples": samples,
            "updates": updates, "syncs": syncs, "bytes_total": sum(bytes_by_rank), "bytes_busiest": max(bytes_by_rank),
            "bytes_by_rank": bytes_by_rank, "accuracy": accuracy, "drift": drift, "staleness": staleness,
            "run_dir": str(run.dir)}


def run_gossip(name: str, task: Task, algorithm: str, topology: str, timeout: float) -> dict:
    """All-reduce data parallel or D-PSGD: every rank takes `steps` steps on its shard."""
    run = launch(gossip_ranks, world_size=task.world_size, timeout=timeout, name=name.replace(" ", "_"), task=task,
                 algorithm=algorithm, topology=topology)
    res = run.results
    consensus = run.metrics.query("rank == 0 and step >= 1")["consensus"]  # every rank logs the same value
    return _row(name, run, samples=sum(r["steps"] for r in res) * task.batch, updates=res[0]["steps"],
                syncs=res[0]["steps"], bytes_by_rank=_sent(run) if algorithm != "allreduce"
                else [r["sent_bytes"] for r in res],
                accuracy=sum(r["accuracy"] for r in res) / len(res), drift=float(consensus.mean()))


def _sent(run) -> list[int]:
    """Bytes each rank sent, as the run's comm table counted them."""
    comm = run.comm
    sends = comm[(comm["op"] == "send") & (comm["tag"] == "train")].groupby("rank")["bytes"].sum()
    return [int(sends.get(r, 0)) for r in range(run.world_size)]


def run_parameter_server(name: str, task: Task, mode: str, timeout: float, straggler_delay: float = 0.0) -> dict:
    """Rank 0 holds the parameters; each worker pulls, computes a gradient, pushes."""
    run = launch(parameter_server_ranks, world_size=task.world_size, timeout=timeout, name=name.replace(" ", "_"),
                 task=task, mode=mode, straggler_delay=straggler_delay)
    server = next(r for r in run.results if r["role"] == "server")
    workers = [r for r in run.results if r["role"] == "worker"]
    pushes = [len(w["steps"]["step"]) for w in workers]
    sent = [sum(server["bytes_out"].values())] + [server["bytes_in"][w["rank"]] for w in workers]
    staleness = server["updates"]["version_staleness"]
    return _row(name, run, samples=sum(pushes) * task.batch, updates=server["version"],
                syncs=sum(pushes) / len(pushes), bytes_by_rank=sent, accuracy=ps.accuracy(run.results),
                staleness=sum(staleness) / len(staleness))


def federation(task: Task):
    """The training examples dealt to world_size - 1 clients (IID), and the FedAvg configuration."""
    fed = federated_data.digits(num_clients=task.world_size - 1, seed=task.seed)
    config = federated_sim.Config(rounds=plan(task)["rounds"], epochs=1, batch_size=task.batch, lr=task.lr,
                                  seed=task.seed)
    return fed, config


def federated_samples(fed, config) -> int:
    """Examples the clients trained on, from the round plans (padding of a last batch excluded)."""
    return sum(int((federated_sim.batches(fed.sizes[k], steps, config, r, k) >= 0).sum())
               for r in range(config.rounds) for k, steps in federated_sim.plan_round(fed.sizes, config, r))


def run_federated(name: str, task: Task, timeout: float) -> dict:
    """Rank 0 broadcasts the model each round; each client rank trains one local epoch and sends its update."""
    run = launch(federated_ranks_of, world_size=task.world_size, timeout=timeout, name=name, task=task)
    fed, config = federation(sized(task, run.world_size))
    comm = run.comm.query("tag == 'train'")
    sends = comm[comm.op == "send"].groupby("rank")["bytes"].sum()
    broadcast = comm.query("rank == 0 and op == 'broadcast'")["bytes"].sum() * (run.world_size - 1)
    sent = [int(broadcast)] + [int(sends.get(r, 0)) for r in range(1, run.world_size)]
    accuracy = federated_sim.evaluate(run.results[0], fed.x_test, fed.y_test)["accuracy"]
    return _row(name, run, samples=federated_samples(fed, config), updates=config.rounds, syncs=config.rounds,
                bytes_by_rank=sent, accuracy=accuracy)


RUNNERS: dict[str, Callable[[Task, float], dict]] = {
    "all-reduce": lambda task, timeout: run_gossip("all-reduce", task, "allreduce", "full", timeout),
    "PS sync": lambda task, timeout: run_parameter_server("PS sync", task, "sync", timeout),
    "PS async": lambda task, timeout: run_parameter_server("PS async", task, "async", timeout),
    "gossip ring": lambda task, timeout: run_gossip("gossip ring", task, "dpsgd", "ring", timeout),
    "gossip full": lambda task, timeout: run_gossip("gossip full", task, "dpsgd", "full", timeout),
    "FedAvg": lambda task, timeout: run_federated("FedAvg", task, timeout),
}


def compare(task: Task = Task(), architectures=ARCHITECTURES, timeout: float = 120,
            on_row: Callable[[dict], None] | None = None):
    """Train the task on each architecture in turn (warm ranks); a pandas DataFrame, one row each:
    world_size (of its launch), wall_s, samples, updates, syncs (communication rounds per worker), bytes_total,
    bytes_busiest, bytes_by_rank, accuracy (test; gossip: mean over replicas), drift (mean consensus distance over
    the steps; NaN with a single model), staleness (parameter server: mean version staleness)."""
    import pandas as pd

    unknown = [a for a in architectures if a not in RUNNERS]
    if unknown:
        raise ValueError(f"architectures must be among {ARCHITECTURES}, got {unknown}")
    launch(warm_up, world_size=task.world_size, timeout=timeout)
    rows = []
    for name in architectures:
        rows.append(RUNNERS[name](task, timeout))
        if on_row is not None:
            on_row(rows[-1])
    return pd.DataFrame(rows).set_index("architecture")


def stragglers(task: Task = Task(), delay: float = 0.02, timeout: float = 120):
    """The parameter server, sync and async, with its last worker sleeping `delay` s every step (a
    straggler): a sync step waits for it, an async server takes the others' pushes meanwhile."""
    import pandas as pd

    rows = [run_parameter_server(f"PS {mode} + straggler", task, mode, timeout, straggler_delay=delay)
            for mode in ("sync", "async")]
    return pd.DataFrame(rows).set_index("architecture")


# -- what the busiest rank sends per communication round, as the cluster grows -------------------------

def busiest_bytes_per_sync(architecture: str, n: int, payload: int = PAYLOAD) -> float:
    """The cost model behind the table (message headers left out): bytes the busiest of n ranks sends
    in one communication round. Ring all-reduce 2(N-1)/N·S (Patarasuk & Yuan 2009); gossip one copy
    per neighbour (2 on a ring, N-1 on the full graph); a server or aggregator one copy per worker."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    if n < 3:
        raise ValueError(f"n must be >= 3, got {n}")
    if architecture == "all-reduce":
        return ring_allreduce_bytes(payload, n)
    return {"gossip ring": 2, "gossip full": n - 1}.get(architecture, n - 1) * payload
