"""What one rank records: scalar metrics, communication, per-layer gradient norms, replica drift.

Everything ends up as JSON lines in the run folder. A training step only appends its row to a buffer
(tensors stay tensors, on their device); a background thread encodes and writes the buffer every
`FLUSH_EVERY` seconds, and closing the rank's telemetry (at the end of a job, after a success or an
exception, or at interpreter exit) writes the rest. So a rank that raises loses nothing, a rank killed
outright loses at most the last `FLUSH_EVERY` seconds, and the notebook tails the files while ranks run.
"""

from __future__ import annotations

import atexit
import json
import math
import threading
import time
import weakref
from collections import deque
from pathlib import Path

import torch
from torch import nn

from .comm import Comm
from .runs import append_lines

OVERHEAD_TAG = "telemetry"  # what watching costs; every other tag is the algorithm's own traffic
FLUSH_EVERY = 0.5  # seconds a record may wait in memory before it reaches the disk


def _scalar(value):
    return value.item() if isinstance(value, torch.Tensor) else value  # now: the tensor may change later


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible
    return value


class DDPTraffic:
    """What DDP's gradient all-reduces moved since the last row, counted without a Python comm hook.

    DDP keeps its own C++ all-reduce, so nothing runs in Python per bucket or when a bucket is done. A
    forward pre-hook counts the forwards whose backward will synchronize; each such backward all-reduces
    every gradient byte of the model once. Their seconds are not timed: they overlap backward inside DDP
    (notebook 13's overlap timeline measures how much of them the step still waits for)."""

    def __init__(self):
        self.bytes = self._per_sync = 0

    def count(self, model: nn.parallel.DistributedDataParallel) -> None:
        hook = model._get_ddp_logging_data().get("comm_hook")
        if hook is not None:
            raise ValueError(f"this DDP model already has a comm hook ({hook}); ctx.watch counts DDP's own "
                             "all-reduce of every gradient byte, so watch the model before registering one, or "
                             "count your hook's traffic with ctx.comm")
        ignored = model.parameters_to_ignore
        self._per_sync = sum(p.numel() * p.element_size() for name, p in model.module.named_parameters()
                             if p.requires_grad and name not in ignored)
        model.register_forward_pre_hook(self._forward)

    def _forward(self, model, inputs) -> None:
        if torch.is_grad_enabled() and model.require_backward_grad_sync:
            self.bytes += self._per_sync

    def take(self) -> int:
        """Bytes since the last take, and start counting afresh."""
        taken, self.bytes = self.bytes, 0
        return taken


def flush_open() -> None:
    """Write every open recorder's buffered rows now: this rank is about to be killed (its launcher is gone)."""
    for recorder in list(_OPEN):
        recorder.flush()


class Telemetry:
    """One rank's recorder: rows buffered in memory, written by a background thread in batches.

    A comm record may come from a backend's thread in the middle of backward: it is only queued there
    (deque appends are thread-safe) and counted into the next metrics row."""

    def __init__(self, run_dir: Path, rank: int, flush_every: float = FLUSH_EVERY):
        self.rank = rank
        self.ddp = DDPTraffic()
        self._files = {kind: append_lines(run_dir, kind, rank) for kind in ("metrics", "comm")}
        self._rows: dict[str, list[dict]] = {"metrics": [], "comm": []}
        self._queued: deque[tuple] = deque()
        self._lock = threading.Lock()  # the buffers change hands between the rank and the flusher
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_periodically, args=(flush_every,),
                                         name=f"distlab-telemetry-rank{rank}", daemon=True)
        self._flusher.start()
        atexit.register(self.close)  # a script that dies of an exception still writes its last rows
        _OPEN.add(self)

    def record_comm(self, op: str, payload: int, seconds: float, tag: str) -> None:
        self._queued.append((time.time(), op, tag, payload, seconds))

    def _comm_rows(self) -> tuple[list[dict], dict]:
        """The comm records since the last row (DDP's counted traffic as one record) and their totals,
        training traffic and overhead apart."""
        payload = self.ddp.take()
        if payload:
            self._queued.append((time.time(), "all_reduce", "ddp", payload, 0.0))
        totals = {"comm_bytes": 0, "comm_seconds": 0.0, "overhead_bytes": 0, "overhead_seconds": 0.0}
        rows = []
        while self._queued:
            t, op, tag, payload, seconds = self._queued.popleft()
            kind = "overhead" if tag == OVERHEAD_TAG else "comm"
            totals[f"{kind}_bytes"] += payload
            totals[f"{kind}_seconds"] += seconds
            rows.append({"rank": self.rank, "t": t, "op": op, "tag": tag, "bytes": payload, "seconds": seconds})
        return rows, totals

    def log(self, scalars: dict, grad_norms: GradNorms | None = None) -> None:
        """One metrics row: the scalars, plus the bytes and seconds communicated since the last row.
        `grad_norms` (from GradNormMeter) stay a tensor until the row is written."""
        comm, totals = self._comm_rows()
        row = {"rank": self.rank, "t": time.time(), **{k: _scalar(v) for k, v in scalars.items()}, **totals}
        if grad_norms is not None:
            row[GradNorms.KEY] = grad_norms
        with self._lock:
            self._rows["metrics"].append(row)
            self._rows["comm"] += comm

    def flush(self) -> None:
        """Write every buffered row now (each file in one write)."""
        with self._lock:
            rows, self._rows = self._rows, {"metrics": [], "comm": []}
        _read_norms(rows["metrics"])
        for kind, batch in rows.items():
            if batch:
                self._files[kind].write("".join(json.dumps(_encoded(row)) + "\n" for row in batch))

    def _flush_periodically(self, every: float) -> None:
        while not self._stop.wait(every):
            self.flush()

    def close(self) -> None:
        """Stop the flusher, write what is left, close the files. Safe to call twice."""
        atexit.unregister(self.close)
        _OPEN.discard(self)
        if self._files["metrics"].closed:
            return
        self._stop.set()
        self._flusher.join()
        rows, _ = self._comm_rows()
        with self._lock:
            self._rows["comm"] += rows
        self.flush()
        for file in self._files.values():
            file.close()


_OPEN: weakref.WeakSet[Telemetry] = weakref.WeakSet()  # the recorders flush_open writes out


def _read_norms(rows: list[dict]) -> None:
    """Put each row's per-layer gradient norms in place of its GradNorms, all rows read in one transfer."""
    measured = [(row, row.pop(GradNorms.KEY)) for row in rows if GradNorms.KEY in row]
    if not measured:
        return
    device = measured[0][1].norms[0].device
    values = torch.stack([n.to(device) for _, norms in measured for n in norms.norms]).float().tolist()
    start = 0
    for row, norms in measured:
        row.update(norms.per_layer(values[start:start + len(norms.layers)]))
        start += len(norms.layers)


def _encoded(row: dict) -> dict:
    return {key: _jsonable(value) for key, value in row.items()}


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the real model in .module


def _layer(name: str) -> str:
    return "grad/" + (name.rsplit(".", 1)[0] if "." in name else name)


class GradNorms:
    """The L2 norm of every parameter's gradient in one fused call (`torch._foreach_norm`, as
    `clip_grad_norm_` does), kept as tensors on the gradients' device until the row is written; only
    then (on the flusher thread) are they read, in one transfer, and combined per layer (module owning
    parameters), as 'grad/<layer>'."""

    KEY = "_grad_norms"  # where a buffered row keeps them until it is written

    def __init__(self, layers: tuple[str, ...], norms: list[torch.Tensor]):
        self.layers, self.norms = layers, norms

    def per_layer(self, values: list[float] | None = None) -> dict[str, float]:
        """Combined per layer; `values` are the norms already read (else they are read now)."""
        squares: dict[str, float] = {}
        values = torch.stack(self.norms).float().tolist() if values is None else values
        for layer, norm in zip(self.layers, values):
            squares[layer] = squares.get(layer, 0.0) + norm * norm
        return {layer: math.sqrt(square) for layer, square in squares.items()}


class GradNormMeter:
    """Measures GradNorms of one model, step after step; names and layers are worked out once."""

    def __init__(self, model: nn.Module):
        named = list(_unwrap(model).named_parameters())
        self._params = [p for _, p in named]
        self._layers = tuple(_layer(name) for name, _ in named)

    def measure(self) -> GradNorms | None:
        grads = [p.grad for p in self._params]
        if any(g is None for g in grads):  # some parameters took no part in this backward: name the others
            kept = [(layer, g) for layer, g in zip(self._layers, grads) if g is not None]
            if not kept:
                return None
            layers, grads = zip(*kept)
        else:
            layers = self._layers
        if any(g.requires_grad for g in grads):  # made with create_graph=True: no graph may grow here
            grads = [g.detach() for g in grads]
        return GradNorms(layers, torch._foreach_norm(grads))


def grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the gradient of each layer (module owning parameters), keyed 'grad/<layer>'."""
    norms = GradNormMeter(model).measure()
    return {} if norms is None else norms.per_layer()


class Drift:
    """This rank's L2 distance to the mean of all replicas' parameters, measured without stalling.

    The all-reduce of the parameters starts at once and runs while training goes on; `value()` waits
    for it. It is a collective: every rank must measure at the same point. Its traffic is overhead.
    """

    def __init__(self, model: nn.Module, comm: Comm):
        self._flat = torch.cat([p.detach().reshape(-1) for p in _unwrap(model).parameters()])
        self._sum = self._flat.clone()
        self._pending = comm.all_reduce_async(self._sum, tag=OVERHEAD_TAG)

    def value(self) -> float:
        self._pending.wait()
        mean = self._sum.div_(torch.distributed.get_world_size())
        return torch.linalg.vector_norm(mean.sub_(self._flat)).item()
