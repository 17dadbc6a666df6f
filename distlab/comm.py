"""Instrumented communication: every op distlab issues records its payload bytes and seconds.

`Comm` wraps the torch.distributed calls a training function uses; `ddp_comm_hook` does the same for
DistributedDataParallel's gradient all-reduce. Records go to the rank's telemetry (see telemetry.py),
tagged "train" (the algorithm's own traffic) or "telemetry" (what watching it costs). `Events` logs
every send/recv of a hand-written collective (collectives.py) for the cost table and the replay; the
alpha-beta model at the end gives the bytes each algorithm must send and fits latency and bandwidth.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

Record = Callable[[str, int, float, str], None]  # (op, payload bytes, seconds, tag)


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def ring_allreduce_bytes(payload: int, world_size: int) -> float:
    """Bytes each rank sends in a ring all-reduce of `payload` bytes: 2(N-1)/N * S (the model;
    `sent_bytes` counts the exact chunks)."""
    return 2 * (world_size - 1) / world_size * payload


class Comm:
    """torch.distributed collectives that count what they move.

    On CUDA the clock stops after a device synchronize, so seconds include the transfer itself.
    """

    def __init__(self, record: Record):
        self._record = record

    def _timed(self, op: str, tensor: torch.Tensor | None, call: Callable[[], object], tag: str):
        start = time.perf_counter()
        out = call()
        if tensor is not None and tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
        self._record(op, 0 if tensor is None else nbytes(tensor), time.perf_counter() - start, tag)
        return out

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, tag: str = "train", group=None) -> torch.Tensor:
        self._timed("all_reduce", tensor, lambda: dist.all_reduce(tensor, op=op, group=group), tag)
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, tag: str = "train") -> Pending:
        """Start an all-reduce and return at once; `.wait()` on the handle finishes and records it."""
        start = time.perf_counter()
        work = dist.all_reduce(tensor, op=op, async_op=True)
        return Pending(work, lambda: self._record("all_reduce", nbytes(tensor), time.perf_counter() - start, tag))

    def broadcast(self, tensor: torch.Tensor, src: int = 0, tag: str = "train") -> torch.Tensor:
        self._timed("broadcast", tensor, lambda: dist.broadcast(tensor, src=src), tag)
        return tensor

    def all_gather(self, tensor: torch.Tensor, tag: str = "train") -> list[torch.Tensor]:
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        self._timed("all_gather", tensor, lambda: dist.all_gather(out, tensor), tag)
        return out

    def send(self, tensor: torch.Tensor, dst: int, tag: str = "train") -> None:
        self._timed("send", tensor, lambda: dist.send(tensor, dst=dst), tag)

    def recv(self, tensor: torch.Tensor, src: int, tag: str = "train") -> torch.Tensor:
        self._timed("recv", tensor, lambda: dist.recv(tensor, src=src), tag)
        return tensor

    def isend(self, tensor: torch.Tensor, dst: int, tag: str = "train") -> Pending:
        """Start a send and return at once; `.wait()` finishes and records it (seconds: start to wait)."""
        start = time.perf_counter()
        work = dist.isend(tensor, dst=dst)
        return Pending(work, lambda: self._record("send", nbytes(tensor), time.perf_counter() - start, tag))

    def barrier(self, tag: str = "train") -> None:
        self._timed("barrier", None, dist.barrier, tag)

    def events(self, name: str = "p2p", tag: str = "train") -> Events:
        """A log for a hand-written collective (collectives.py) whose transfers also count here, as
        ops "<name> send" and "<name> recv"."""
        return Events(dist.get_rank(), self._record, name, tag)


class Pending:
    """An operation in flight; its seconds run from issue to the end of wait()."""

    def __init__(self, work, on_done: Callable[[], None]):
        self._work, self._on_done = work, on_done

    def wait(self) -> None:
        self._work.wait()
        self._on_done()


def ddp_comm_hook(record: Record):
    """A DDP communication hook: the usual averaged all-reduce of each gradient bucket, counted.

    Seconds run from issuing the bucket's all-reduce to its completion (overlapped with backward).
    The callback runs on the backend's thread while backward goes on: it does no more than record.
    """
    world_size = dist.get_world_size()

    def hook(state, bucket):  # no annotations: DDP rejects a string "dist.GradBucket" (future annotations)
        buffer = bucket.buffer().div_(world_size)
        start = time.perf_counter()
        future = dist.all_reduce(buffer, async_op=True).get_future()

        def done(fut):
            record("all_reduce", nbytes(buffer), time.perf_counter() - start, "ddp")
            return fut.value()[0]

        return future.then(done)

    return hook


# -- every point-to-point transfer of a collective, for the cost table and the replay ----------------

class Events:
    """A log of one rank's sends and receives: peer, chunk, step, phase, start/end times, bytes.

    Collectives written from send/recv (collectives.py) add a row per transfer; `forward` (see
    `Comm.events`) also counts each one in the run's comm table as op "<name> send" / "<name> recv".
    """

    def __init__(self, rank: int, forward: Record, name: str, tag: str):
        self.rank, self.rows = rank, []
        self._forward, self._name, self._tag = forward, name, tag

    def add(self, kind: str, peer: int, payload: int, chunk: int, step: int, phase: str,
            t_start: float, t_end: float) -> None:
        src, dst = (self.rank, peer) if kind == "send" else (peer, self.rank)
        self.rows.append({"rank": self.rank, "kind": kind, "src": src, "dst": dst, "chunk": chunk,
                          "step": step, "phase": phase, "t_start": t_start, "t_end": t_end, "bytes": payload})
        self._forward(f"{self._name} {kind}", payload, t_end - t_start, self._tag)


# -- the alpha-beta (latency-bandwidth) cost model (Hockney 1994; Thakur, Rabenseifner & Gropp 2005) --

ALGORITHMS = ("naive", "ring", "recursive_doubling")


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")


def chunk_sizes(numel: int, parts: int) -> list[int]:
    """Element counts of torch.tensor_split(numel elements, parts): the first numel % parts get one more."""
    return [numel // parts + (i < numel % parts) for i in range(parts)]


def sent_bytes(algorithm: str, numel: int, element_size: int, world_size: int, rank: int) -> int:
    """Bytes one rank sends in an all-reduce of numel elements, counted from the algorithm's schedule.

    ring: every chunk but two, twice around: 2(N-1)/N·S when N divides the size; naive: (N-1)·S at
    the root, S elsewhere; recursive doubling: S per round, plus folding in the ranks past a power of 2.
    """
    _check_algorithm(algorithm)
    n, size = int(world_size), int(numel) * element_size
    if n == 1:
        return 0
    if algorithm == "ring":
        chunks = chunk_sizes(numel, n)
        return (2 * numel - chunks[(rank + 1) % n] - chunks[(rank + 2) % n]) * element_size
    if algorithm == "naive":
        return (n - 1) * size if rank == 0 else size
    power = 1 << (n.bit_length() - 1)
    if rank >= power:
        return size  # folded in: sends its vector once, receives the result
    rounds = power.bit_length() - 1
    return (rounds + (rank < n - power)) * size


def message_rounds(algorithm: str, world_size: int) -> int:
    """Messages on the critical path of one all-reduce: what the latency term alpha is paid for."""
    _check_algorithm(algorithm)
    n = int(world_size)
    power = 1 << (n.bit_length() - 1)
    return {"ring": 2 * (n - 1), "naive": 2 * (n - 1),
            "recursive_doubling": power.bit_length() - 1 + 2 * (n > power)}[algorithm]


def critical_bytes(algorithm: str, numel: int, element_size: int, world_size: int) -> int:
    """Bytes on the critical path: the busiest rank's sends (what the bandwidth term beta is paid for)."""
    return max(sent_bytes(algorithm, numel, element_size, world_size, r) for r in range(world_size))


def fit_alpha_beta(rounds: list[int], nbytes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares alpha (s per message) and beta (s per byte) of t = alpha·rounds + beta·bytes.

    Each row is weighted by 1/t, so small messages count as much as large ones (relative error).
    """
    import numpy as np

    t = np.asarray(seconds, dtype=float)
    design = np.column_stack([rounds, nbytes]).astype(float) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    return float(alpha), float(beta)


def predict_seconds(alpha: float, beta: float, rounds: int, nbytes: int) -> float:
    return alpha * rounds + beta * nbytes
