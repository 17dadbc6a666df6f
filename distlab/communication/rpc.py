"""Remote procedure calls and remote references with torch.distributed.rpc.

A collective needs every rank at the same call; an RPC is one rank asking another to run a function
(rpc_sync / rpc_async) or to keep an object for it (rpc.remote returns an RRef: a handle to an object
that lives on its owner). Parameter servers (notebook 03) are built this way.

Where it listens: the ranks meet through a file in the run folder (mode 0700), not a tcp:// rendezvous,
whose TCPStore on rank 0 would listen on every interface; TensorPipe's own sockets stay on loopback
(dl.launch sets TP_SOCKET_IFNAME). TensorPipe has no authentication and carries pickled calls, so
other users of this machine can still reach those loopback sockets: on a shared server, RPC is for
trusted users only.
"""

from __future__ import annotations

import warnings

import torch
from torch.distributed import rpc

from ..ranks import needs_gloo


def available() -> bool:
    """torch.distributed.rpc is missing from some builds (e.g. some Windows and macOS wheels)."""
    return rpc.is_available()


def worker(rank: int) -> str:
    return f"worker{rank}"


def rendezvous(ctx) -> str:
    """RPC needs its own rendezvous: a file in the run folder, which only this user can open, one per
    attempt (a restart must not read the last attempt's). A tcp:// one would listen on every interface."""
    return f"file://{ctx.run_dir / f'rpc-store-{ctx.attempt}'}"


_started_before = False  # torch.distributed.rpc does not start again in a process where it was shut down


def start(ctx, timeout: float = 60.0) -> None:
    """rpc.init_rpc on every rank of the launch, as worker<rank>, over TensorPipe on loopback.

    Once per process: launch the function with dl.launch(..., fresh=True)."""
    global _started_before
    if _started_before:
        raise RuntimeError("torch.distributed.rpc cannot be started twice in one process (its RRef state "
                           "outlives rpc.shutdown): launch with dl.launch(..., fresh=True)")
    _started_before = True
    options = rpc.TensorPipeRpcBackendOptions(init_method=rendezvous(ctx), rpc_timeout=timeout, num_worker_threads=4)
    with warnings.catch_warnings():  # init_rpc's own device-map exchange trips a deprecation warning of torch's
        warnings.filterwarnings("ignore", "You are using a Backend", UserWarning)
        rpc.init_rpc(worker(ctx.rank), rank=ctx.rank, world_size=ctx.world_size, rpc_backend_options=options)


class Counter:
    """An object that lives on one rank; the others update it through an RRef."""

    def __init__(self):
        self.total, self.calls = 0.0, []

    def add(self, value: float, caller: int) -> float:
        self.total += value
        self.calls.append(caller)
        return self.total

    def state(self) -> tuple[float, list[int]]:
        return self.total, sorted(self.calls)


def host(value: float) -> torch.Tensor:
    """What an RPC carries: TensorPipe moves CPU tensors unless given a device map, whatever the rank's device."""
    return torch.tensor([value], device="cpu")


def where_am_i(x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Runs on the callee: it says who it is, and squares what it was sent."""
    return rpc.get_worker_info().name, x * x


def contribute(counter, rank: int) -> float:
    """Runs on `rank`: it got an RRef in the call's arguments and adds to the object behind it."""
    return counter.rpc_sync().add(float(rank + 1), rank)


@needs_gloo("RPC beside an NCCL group is beyond this demo: its TensorPipe agent carries CPU tensors")
def demo(ctx) -> dict:
    """rpc_sync and rpc_async to the other ranks; rank 0 creates a Counter on the last rank (rpc.remote),
    passes its RRef to every rank, and each adds rank + 1 to it."""
    start(ctx)
    right = worker((ctx.rank + 1) % ctx.world_size)
    callee, squared = rpc.rpc_sync(right, where_am_i, args=(host(ctx.rank + 1.0),))
    futures = [rpc.rpc_async(worker(r), where_am_i, args=(host(float(r)),)) for r in range(ctx.world_size)]
    result = {"callee": callee, "squared": squared.item(), "answers": [f.wait()[0] for f in futures]}
    if ctx.rank == 0:
        counter = rpc.remote(worker(ctx.world_size - 1), Counter)  # returns at once: an RRef
        adds = [rpc.rpc_async(worker(r), contribute, args=(counter, r)) for r in range(ctx.world_size)]
        torch.futures.wait_all(adds)
        result["counter_owner"] = counter.owner().name
        result["total"], result["calls"] = counter.rpc_sync().state()
        result["here"] = counter.to_here().total  # a copy of the remote object, fetched
    rpc.shutdown()  # waits for every worker's outstanding calls
    return result
