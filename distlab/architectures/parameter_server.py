"""Parameter server (master-worker): server ranks hold the parameters, worker ranks pull, compute, push.

Ranks 0..k-1 are servers, each holding one contiguous range of the flattened parameters (split
evenly, or snapped to whole tensors); the other ranks are workers, each with its own shard of the data
(Li et al. 2014, "Scaling Distributed Machine Learning with the Parameter Server").

One server loop covers BSP, SSP and ASP through a staleness bound s (Ho et al. 2013, "More Effective
Distributed ML via a Stale Synchronous Parallel Parameter Server"). A worker's clock is the number of
pushes it made; a server answers its pull only when it is at most s clocks ahead of the slowest live
worker, and records that gap as the read's `clock_staleness`.
- s = 0 (BSP, "sync"): the pushes of a step are averaged and applied as one update: data-parallel SGD.
- s > 0: each push is applied as it arrives, scaled by 1/(live workers), so a full round of pushes
  moves the parameters as far as one BSP step. s = inf is ASP ("async").
Every applied update also records `version_staleness`: the server's version now minus the version
the worker pulled (versions count applied updates).

A worker that goes silent while the server waits for it is declared dead after `failure_timeout`
seconds and training goes on without it. A server's receiving thread takes every message
(`recv` from any source) and queues it, so the main loop can wait with a timeout: gloo cannot.

A server is the single point of failure: when its process dies the workers' connections to it break and
the launch fails naming the server. With `checkpoint_every=k` each server saves its shard, version and
the workers' clocks every k updates; a job launched with `restarts=` resumes from that checkpoint (every
rank reads it: the workers continue from their clocks, on the minibatches they would have drawn).
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import data, models
from ..comm import nbytes
from ..ranks import needs_gloo, world_sizes
from ..resilience.checkpoint import save_atomically

ANY_SOURCE = "a server receives from any source, which NCCL cannot"

PULL, PUSH, BYE, TOMBSTONE = 0, 1, 2, 3  # message kinds, worker -> server
HEADER, PAYLOAD, REPLY_HEADER, REPLY_PAYLOAD = 1, 2, 3, 4  # point-to-point tags
SHARDINGS = ("range", "tensor")


@dataclass(frozen=True)
class Config:
    """One parameter-server job: the options of `run`, checked once here (`check` adds what needs the world)."""

    staleness: float = 0  # s: 0 BSP, an integer SSP, math.inf ASP
    servers: int = 1  # ranks 0..servers-1 hold the parameters, the others work
    steps: int = 60  # the job is steps x workers pushes
    batch: int = 32
    lr: float = 0.2
    slow_rank: int | None = None  # a straggler: sleeps `delay` seconds every step
    delay: float = 0.0
    jitter: float = 0.0  # every worker sleeps `delay` at a step with this probability
    crash_rank: int | None = None  # a worker stops silently at step `crash_at`; a server's process dies at
    crash_at: int | None = None  # update `crash_at` (first attempt only, so a restarted job gets past it)
    checkpoint_every: int = 0  # a server saves its state every k updates (0: never), for a restart to resume
    failure_timeout: float = 2.0  # seconds of silence before a server declares a worker dead
    shard: str = "range"  # how the flat parameters are split among the servers: SHARDINGS
    hidden: int = 32
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.staleness, int) or self.staleness == math.inf) or self.staleness < 0:
            raise ValueError(f"staleness must be an integer >= 0 or math.inf, got {self.staleness!r}")
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError(f"steps, batch and lr must be positive, got steps={self.steps}, batch={self.batch}, "
                             f"lr={self.lr}")
        if not 0 <= self.delay < self.failure_timeout:
            raise ValueError(f"delay must be >= 0 and below failure_timeout={self.failure_timeout}, got {self.delay}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be a probability in [0, 1], got {self.jitter}")
        if self.crash_rank is not None and not (isinstance(self.crash_at, int) and 0 <= self.crash_at < self.steps):
            raise ValueError(f"crash_at must be a step in 0..{self.steps - 1} when crash_rank is set, "
                             f"got {self.crash_at!r}")
        if self.shard not in SHARDINGS:
            raise ValueError(f"shard must be one of {SHARDINGS}, got {self.shard!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0 (0: no checkpoints), "
                             f"got {self.checkpoint_every!r}")
        if self.checkpoint_every and self.servers > 1 and self.staleness != 0:
            raise ValueError("checkpoint_every with several servers needs staleness=0 (sync): only there do all "
                             "servers save the same round, a consistent snapshot")

    def check(self, world_size: int, backend: str) -> None:
        """What depends on the launch: gloo (a server receives from any source), and who may serve or work."""
        if backend != "gloo":
            raise ValueError(f"the parameter server needs backend='gloo' ({ANY_SOURCE}), got {backend!r}: launch "
                             "ps.run or ps.train themselves (backend='auto' picks gloo for them, over CUDA tensors "
                             "on GPUs), mark your own function @distlab.ranks.needs_gloo(...), or pass backend='gloo'")
        if not 1 <= self.servers < world_size:
            raise ValueError(f"servers must be between 1 and world_size - 1 = {world_size - 1}, got {self.servers}")
        if self.slow_rank is not None and not self.servers <= self.slow_rank < world_size:
            raise ValueError(f"slow_rank must be a worker rank ({self.servers}..{world_size - 1}) or None, "
                             f"got {self.slow_rank}")
        if self.crash_rank is not None and not 0 <= self.crash_rank < world_size:
            raise ValueError(f"crash_rank must be a rank (0..{world_size - 1}: a server below {self.servers}, "
                             f"else a worker) or None, got {self.crash_rank}")

    def fits(self, world_size: int) -> bool:
        """Whether a launch of world_size ranks has room for the servers and the ranks these options name."""
        named = [r for r in (self.slow_rank, self.crash_rank) if r is not None]
        return self.servers < world_size and all(r < world_size for r in named) and (
            self.slow_rank is None or self.slow_rank >= self.servers)


def fits_world(world_size: int, config: Config | None = None, mode: str | None = None, **options) -> bool:
    """The world-size rule of `run` and `train` (dl.launch refuses the other sizes before starting a rank)."""
    fields = {k: v for k, v in options.items() if k in Config.__dataclass_fields__}
    return (Config(**fields) if config is None else replace(config, **fields)).fits(world_size)


FITS = "the servers need at least one worker beside them, and slow_rank / crash_rank must be ranks of the launch"


# -- what the servers hold ----------------------------------------------------------------------------

def build_model(seed: int = 0, hidden: int = 32) -> nn.Module:
    """The digits MLP every rank builds the same way, so servers start from identical parameters."""
    torch.manual_seed(seed)
    return models.mlp(64, hidden, 10)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def shard_bounds(sizes: list[int], servers: int, by: str = "range") -> list[tuple[int, int]]:
    """[lo, hi) of the flat parameter vector each server holds: an even split of the key range
    ("range"), or the same split with each cut moved to the nearest tensor boundary ("tensor")."""
    if by not in SHARDINGS:
        raise ValueError(f"shard must be one of {SHARDINGS}, got {by!r}")
    total = sum(sizes)
    if not 1 <= servers <= (len(sizes) if by == "tensor" else total):
        raise ValueError(f"servers must be between 1 and {len(sizes)} for shard={by!r}, got {servers}")
    cuts = [round(total * j / servers) for j in range(servers + 1)]
    if by == "tensor":
        edges = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        for j in range(1, servers):
            free = [e for e in edges if cuts[j - 1] < e < total]
            cuts[j] = min(free, key=lambda e: abs(e - cuts[j]))
    return list(zip(cuts, cuts[1:]))


def checkpoint_file(run_dir: str | os.PathLike, server: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"server{server}.pt"


def last_checkpoint(run_dir: str | os.PathLike, server: int, device: torch.device) -> dict | None:
    """What server `server` saved last in this run folder (a previous attempt's), or None."""
    path = checkpoint_file(run_dir, server)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {**state, "params": state["params"].to(device)}


# -- the worker ----------------------------------------------------------------------------------------

class Worker:
    """Pull all shards, compute a gradient on a minibatch of its data, push each shard's part."""

    def __init__(self, ctx, bounds, config: Config, start: int = 0):
        self.bounds, self.start = bounds, start  # start: the clock to resume at (0, or a checkpoint's)
        self.index = ctx.rank - len(bounds)  # its data shard and minibatches are those of DDP's rank `index`
        x, y, _, _ = data.digits(self.index, ctx.world_size - len(bounds))
        self.batches = data.minibatches(x, y, config.batch, config.seed, self.index, start=start)
        self.model = build_model(config.seed, config.hidden)
        self.flat = flat_parameters(self.model)
        self.versions = [0] * len(bounds)
        self.gaps = [0] * len(bounds)

    def pull(self, clock: int) -> bool:
        """Ask every server for its shard (replies posted first, so no server waits on another).
        False when a server says the job is done."""
        headers = [torch.zeros(3, dtype=torch.int64) for _ in self.bounds]
        pending = []
        for server, (lo, hi) in enumerate(self.bounds):
            pending.append(dist.irecv(headers[server], src=server, tag=REPLY_HEADER))
            pending.append(dist.irecv(self.flat[lo:hi], src=server, tag=REPLY_PAYLOAD))
        for server in range(len(self.bounds)):
            dist.send(torch.tensor([PULL, clock, 0, 0]), dst=server, tag=HEADER)
        for work in pending:
            work.wait()
        self.versions = [int(h[0]) for h in headers]
        self.gaps = [int(h[1]) for h in headers]
        nn.utils.vector_to_parameters(self.flat, self.model.parameters())
        return not any(h[2] for h in headers)

    def push(self, clock: int, grad: torch.Tensor) -> None:
        for server, (lo, hi) in enumerate(self.bounds):
            header = torch.tensor([PUSH, clock, self.versions[server], self.gaps[server]])
            dist.send(header, dst=server, tag=HEADER)
            dist.send(grad[lo:hi].contiguous(), dst=server, tag=PAYLOAD)

    def say(self, kind: int) -> None:
        for server in range(len(self.bounds)):
            dist.send(torch.tensor([kind, 0, 0, 0]), dst=server, tag=HEADER)


def run_worker(ctx, worker: Worker, config: Config, t0: float) -> dict:
    """Pull, compute, push until the servers say the job is done (or until crashing at `config.crash_at`).

    The slow rank sleeps `delay` seconds every step; any worker does so at a step with probability `jitter`.
    """
    rows = {"step": [], "t": [], "loss": [], "clock_staleness": [], "wait": []}
    hiccups = data.generator(config.seed, ctx.rank)
    slow = ctx.rank == config.slow_rank
    crash_at = config.crash_at if ctx.rank == config.crash_rank else None
    crashed = None
    for step in itertools.count(worker.start):
        if step == crash_at:
            crashed = step  # silently stop: no goodbye, the servers must notice on their own
            break
        start = time.perf_counter()
        if not worker.pull(step):
            break
        waited = time.perf_counter() - start
        if slow or torch.rand(1, generator=hiccups, device="cpu").item() < config.jitter:
            time.sleep(config.delay)
        grad, loss = models.gradient(worker.model, *next(worker.batches))
        worker.push(step, grad)
        for key, value in zip(rows, (step, time.time() - t0, loss, max(worker.gaps), waited)):
            rows[key].append(value)
        ctx.log(step=step, loss=loss, clock_staleness=max(worker.gaps), wait=waited, attempt=ctx.attempt)
    wall = time.time() - t0
    if crashed is None:
        worker.say(BYE)
    dist.barrier()  # training is over everywhere
    if crashed is not None:
        worker.say(TOMBSTONE)  # lets the servers' receiving threads end; a real crash closes the sockets
    return {"role": "worker", "rank": ctx.rank, "steps": rows, "crashed_at": crashed, "wall_s": wall,
            "resumed_from": worker.start}


# -- the server ----------------------------------------------------------------------------------------

def receive_messages(inbox: queue.Queue, shard: int, n_workers: int, counts: dict, device: torch.device) -> None:
    """The server's receiving thread: every header (and push payload) from any worker, queued in order.
    A thread has torch's own default device, not the job's: its tensors say `device`.

    It ends after one last message from each worker: BYE, or the TOMBSTONE of one that crashed.
    """
    endings = 0
    while endings < n_workers:
        header = torch.zeros(4, dtype=torch.int64, device=device)
        src = dist.recv(header, src=None, tag=HEADER)
        grad = None
        if header[0] == PUSH:
            grad = torch.empty(shard, device=device)
            dist.recv(grad, src=src, tag=PAYLOAD)
        counts[src] = counts.get(src, 0) + nbytes(header) + (0 if grad is None else nbytes(grad))
        endings += int(header[0] in (BYE, TOMBSTONE))
        inbox.put((time.time(), src, header.tolist(), grad))


class Server:
    """One shard of the parameters, the workers' clocks, and the rule for when a pull may be answered."""

    def __init__(self, params: torch.Tensor, workers: list[int], config: Config, t0: float,
                 resume: dict | None = None):
        self.params, self.staleness, self.lr = params, config.staleness, config.lr
        self.budget = config.steps * len(workers)  # the job's pushes
        self.failure_timeout, self.t0 = config.failure_timeout, t0
        self.clock = {w: 0 for w in workers}
        self.version, self.pushes = 0, 0
        if resume is not None:  # a restart: the state of the last checkpoint, not the initial one
            self.params = resume["params"]
            self.version, self.pushes, self.clock = resume["version"], resume["pushes"], dict(resume["clock"])
        self.resumed_from = self.version
        self.state = {w: "live" for w in workers}  # live, done, dead
        self.heard = {w: time.time() for w in workers}
        self.waiting: dict[int, tuple[int, float]] = {}  # worker -> (clock, since) of a pull on hold
        self.round_sum, self.round_pushes = torch.zeros_like(params), 0
        self.updates = {k: [] for k in ("t", "worker", "clock", "version", "version_staleness",
                                        "clock_staleness")}
        self.pulls = {k: [] for k in ("t", "worker", "clock", "clock_staleness", "wait")}
        self.events: list[dict] = []
        self.bytes_out: dict[int, int] = {}

    def not_dead(self) -> list[int]:
        return [w for w, s in self.state.items() if s != "dead"]

    def slowest_clock(self) -> int:
        return min(self.clock[w] for w in self.not_dead())

    def handle(self, at: float, src: int, header: list[int], grad: torch.Tensor | None) -> None:
        kind, clock, pulled_version, gap = header
        self.heard[src] = at
        if self.state[src] == "dead":
            self.state[src] = "live"  # suspected wrongly: it was only slow
            self.events.append({"t": at - self.t0, "worker": src, "event": "back"})
        if kind == PULL:
            self.waiting[src] = (clock, at)
        elif kind == PUSH:
            self.apply(src, clock, pulled_version, gap, grad)
        elif kind == BYE:
            self.state[src] = "done"

    def apply(self, src: int, clock: int, pulled_version: int, gap: int, grad: torch.Tensor) -> None:
        self.clock[src] = clock + 1
        self.pushes += 1
        for key, value in zip(self.updates, (time.time() - self.t0, src, clock, self.version,
                                             self.version - pulled_version, gap)):
            self.updates[key].append(value)
        if self.staleness == 0:
            self.round_sum += grad
            self.round_pushes += 1
        else:
            self.params -= self.lr / len(self.not_dead()) * grad
            self.version += 1

    def close_round(self) -> None:
        """BSP: once every live worker pushed this step, apply the mean of the pushes as one update."""
        if self.staleness == 0 and self.round_pushes and self.slowest_clock() > self.version:
            self.params -= self.lr * self.round_sum / self.round_pushes
            self.round_sum.zero_()
            self.round_pushes = 0
            self.version += 1

    def suspect(self, now: float) -> None:
        """A live worker we are not holding back and have not heard from for too long is declared dead."""
        for w, state in self.state.items():
            if state == "live" and w not in self.waiting and now - self.heard[w] > self.failure_timeout:
                self.state[w] = "dead"
                self.events.append({"t": now - self.t0, "worker": w, "event": "dead"})

    def answer_pulls(self) -> None:
        """Answer each pull on hold that the bound allows; once the job's pushes are in, answer "stop"."""
        done = self.pushes >= self.budget
        for w, (clock, since) in list(self.waiting.items()):
            gap = clock - self.slowest_clock()
            if done or (gap <= self.staleness and (self.staleness > 0 or self.version == clock)):
                del self.waiting[w]
                self.heard[w] = time.time()  # from now on it owes us a push: the failure clock restarts
                header = torch.tensor([self.version, gap, int(done)])
                dist.send(header, dst=w, tag=REPLY_HEADER)
                dist.send(self.params, dst=w, tag=REPLY_PAYLOAD)
                self.bytes_out[w] = self.bytes_out.get(w, 0) + nbytes(header) + nbytes(self.params)
                if not done:
                    row = (time.time() - self.t0, w, clock, gap, time.time() - since)
                    for key, value in zip(self.pulls, row):
                        self.pulls[key].append(value)

    def serving(self) -> bool:
        return any(s == "live" for s in self.state.values())

    def save(self, path: Path) -> None:
        """Parameters, version, pushes and clocks: all a restarted server needs to go on where it was."""
        save_atomically({"params": self.params, "version": self.version, "pushes": self.pushes,
                         "clock": self.clock}, path)


def crash(rank: int, version: int) -> None:
    """A server's real death (SIGKILL, no goodbye): the workers' connections to it break, the launch fails."""
    print(f"fault injected: parameter server rank {rank} crashed at update {version}", file=sys.stderr, flush=True)
    time.sleep(0.2)  # the launcher reads this line before it sees the process gone
    os.kill(os.getpid(), signal.SIGKILL)


def run_server(ctx, bounds: list[tuple[int, int]], config: Config, t0: float, resume: dict | None = None) -> dict:
    """Serve this rank's shard until no worker is live; returns what it applied, answered and counted.
    Saves a checkpoint every `checkpoint_every` updates; dies at update `crash_at` if it is the crash rank."""
    lo, hi = bounds[ctx.rank]
    workers = list(range(len(bounds), ctx.world_size))
    params = flat_parameters(build_model(config.seed, config.hidden))[lo:hi]
    server = Server(params, workers, config, t0, resume)
    saved = server.version
    crash_at = config.crash_at if ctx.rank == config.crash_rank and ctx.attempt == 0 else None
    inbox: queue.Queue = queue.Queue()
    bytes_in: dict[int, int] = {}
    receiver = threading.Thread(target=receive_messages, args=(inbox, hi - lo, len(workers), bytes_in, ctx.device),
                                daemon=True)
    receiver.start()
    busy, messages = 0.0, 0
    while server.serving():
        try:
            message = inbox.get(timeout=0.02)
        except queue.Empty:
            message = None
        start = time.perf_counter()
        if message is not None:
            server.handle(*message)
            messages += 1
        server.suspect(time.time())
        server.close_round()
        if config.checkpoint_every and server.version >= saved + config.checkpoint_every:
            server.save(checkpoint_file(ctx.run_dir, ctx.rank))
            saved = server.version
        if server.version == crash_at:
            crash(ctx.rank, server.version)
        server.answer_pulls()
        busy += time.perf_counter() - start
    dist.barrier()  # training is over everywhere; crashed workers now send their tombstones
    receiver.join()
    return {"role": "server", "rank": ctx.rank, "range": (lo, hi), "params": server.params.tolist(),
            "version": server.version, "pushes": server.pushes, "resumed_from": server.resumed_from,
            "updates": server.updates, "pulls": server.pulls, "events": server.events, "bytes_in": bytes_in,
            "bytes_out": server.bytes_out, "messages": messages, "busy_s": busy, "wall_s": time.time() - t0}


# -- the rank function ---------------------------------------------------------------------------------

@world_sizes(fits_world, FITS)
@needs_gloo(ANY_SOURCE)
def run(ctx, config: Config | None = None, **options) -> dict:
    """Train the digits MLP on a parameter server with staleness bound `staleness` (0 BSP, inf ASP).

    Options: a Config, or its fields as keywords (which override the Config's). The job is `steps` x
    workers minibatch gradients: the servers answer "stop" once they got that many pushes, so under ASP
    fast workers take more steps and a straggler fewer. `slow_rank` sleeps `delay` seconds per step (a
    straggler), every worker with probability `jitter` per step (transient stragglers); `crash_rank`
    stops silently at step `crash_at` if a worker, dies at update `crash_at` if a server (first attempt
    only). With `checkpoint_every` and `dl.launch(restarts=)`, a restart resumes from the servers' last
    checkpoint. Returns this rank's record: a server's updates, pulls, events, bytes and final shard, or a
    worker's loss, clock staleness and waiting time per step; both with `resumed_from` (0 on a fresh start).
    """
    config = Config(**options) if config is None else replace(config, **options)
    config.check(ctx.world_size, ctx.backend)
    sizes = [p.numel() for p in build_model(config.seed, config.hidden).parameters()]
    bounds = shard_bounds(sizes, config.servers, config.shard)
    ctx.set_total(config.steps)
    # read before the barrier, so no server has overwritten it yet: a worker resumes at the clock a server saved
    resume = last_checkpoint(ctx.run_dir, min(ctx.rank, config.servers - 1), ctx.device) if ctx.attempt else None
    if ctx.rank < config.servers:
        dist.barrier()
        return run_server(ctx, bounds, config, time.time(), resume)
    worker = Worker(ctx, bounds, config, resume["clock"][ctx.rank] if resume else 0)  # data loaded before the clock
    dist.barrier()
    return run_worker(ctx, worker, config, time.time())


MODES = {"sync": 0, "async": math.inf}


@world_sizes(fits_world, FITS)
@needs_gloo(ANY_SOURCE)
def train(ctx, mode: str = "sync", **options) -> dict:
    """The parameter server in its two classic modes: "sync" (BSP, s = 0) or "async" (ASP, s = inf)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    return run(ctx, staleness=MODES[mode], **options)


# -- the well-kept built-in, and reading the result back ----------------------------------------------

@world_sizes(lambda n, workers=None, **_: workers is None or n == workers,
             "set beside a parameter server's run, DDP needs one rank per worker (workers=)")
def ddp_train(ctx, steps: int = 60, batch: int = 32, lr: float = 0.2, hidden: int = 32, seed: int = 0,
              workers: int | None = None) -> list:
    """Data-parallel SGD with DistributedDataParallel on the same shards and minibatches as the
    workers: what a synchronous parameter server computes. Returns the final flat parameters.
    `workers`: the parameter server's worker count this run is compared with (then world_size must equal it)."""
    model = nn.parallel.DistributedDataParallel(build_model(seed, hidden))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    x, y, _, _ = data.digits(ctx.rank, ctx.world_size)
    batches = data.minibatches(x, y, batch, seed, ctx.rank)
    for step in range(steps):
        xb, yb = next(batches)
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ctx.log(step=step, loss=loss.item())
    return flat_parameters(model.module).tolist()


def final_parameters(results: list[dict]) -> torch.Tensor:
    """The servers' shards put back together into one flat vector."""
    shards = sorted((r["range"], r["params"]) for r in results if r["role"] == "server")
    return torch.tensor([v for _, params in shards for v in params])


def accuracy(results: list[dict], hidden: int = 32) -> float:
    """Accuracy on the held-out digits of the model the servers ended with."""
    model = build_model(0, hidden)
    nn.utils.vector_to_parameters(final_parameters(results), model.parameters())
    _, _, x, y = data.digits()
    return models.accuracy(model, x, y)
