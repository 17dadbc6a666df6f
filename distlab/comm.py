"""Instrumented communication: every op distlab issues records its payload bytes and seconds.

`Comm` wraps the torch.distributed calls a training function uses (DistributedDataParallel's own
all-reduce is counted apart, by telemetry.DDPTraffic). Records go to the rank's telemetry (see telemetry.py),
tagged "train" (the algorithm's own traffic) or "telemetry" (what watching it costs). `Events` logs
every send/recv of a hand-written collective (communication/collectives.py) for the cost table and the
replay; communication/cost.py says what each algorithm should have sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

Record = Callable[[str, int, float, str], None]  # (op, payload bytes, seconds, tag)


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


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

    def irecv(self, tensor: torch.Tensor, src: int, tag: str = "train") -> Pending:
        """Start a receive into `tensor` and return at once; after `.wait()` the tensor holds the message."""
        start = time.perf_counter()
        work = dist.irecv(tensor, src=src)
        return Pending(work, lambda: self._record("recv", nbytes(tensor), time.perf_counter() - start, tag))

    def barrier(self, tag: str = "train") -> None:
        self._timed("barrier", None, dist.barrier, tag)

    def events(self, name: str = "p2p", tag: str = "train") -> Events:
        """A log for a hand-written collective (communication/collectives.py) whose transfers also count here, as
        ops "<name> send" and "<name> recv"."""
        return Events(dist.get_rank(), self._record, name, tag)


class Pending:
    """An operation in flight; its seconds run from issue to the end of wait()."""

    def __init__(self, work, on_done: Callable[[], None]):
        self._work, self._on_done = work, on_done

    def wait(self) -> None:
        self._work.wait()
        self._on_done()


# -- every point-to-point transfer of a collective, for the cost table and the replay ----------------

class Events:
    """A log of one rank's sends and receives: peer, chunk, step, phase, start/end times, bytes.

    Collectives written from send/recv (communication/collectives.py) add a row per transfer; `forward` (see
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
