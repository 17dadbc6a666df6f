"""What one rank records: scalar metrics, communication, per-layer gradient norms, replica drift.

Everything is written as JSON lines into the run folder and flushed line by line, so a kernel that
dies mid-run loses nothing already logged, and the notebook can tail the files while ranks run.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from pathlib import Path

import torch
from torch import nn

from .comm import Comm
from .runs import append_lines

OVERHEAD_TAG = "telemetry"  # what watching costs; every other tag is the algorithm's own traffic


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible
    return value


class Telemetry:
    """One rank's recorder.

    A comm record may come from DDP's callback thread in the middle of backward: it is only queued
    there (deque appends are thread-safe) and written with the next metrics row, off the hot path.
    """

    def __init__(self, run_dir: Path, rank: int):
        self.rank = rank
        self._metrics = append_lines(run_dir, "metrics", rank)
        self._comm = append_lines(run_dir, "comm", rank)
        self._queued: deque[tuple] = deque()

    def record_comm(self, op: str, payload: int, seconds: float, tag: str) -> None:
        self._queued.append((time.time(), op, tag, payload, seconds))

    def _write_comm(self) -> dict:
        """Write the queued comm records; return their totals, training traffic and overhead apart."""
        totals = {"comm_bytes": 0, "comm_seconds": 0.0, "overhead_bytes": 0, "overhead_seconds": 0.0}
        lines = []
        while self._queued:
            t, op, tag, payload, seconds = self._queued.popleft()
            kind = "overhead" if tag == OVERHEAD_TAG else "comm"
            totals[f"{kind}_bytes"] += payload
            totals[f"{kind}_seconds"] += seconds
            row = {"rank": self.rank, "t": t, "op": op, "tag": tag, "bytes": payload, "seconds": seconds}
            lines.append(json.dumps(row) + "\n")
        if lines:
            self._comm.write("".join(lines))
        return totals

    def log(self, scalars: dict) -> None:
        """One metrics row: the scalars, plus the bytes and seconds communicated since the last row."""
        row = {"rank": self.rank, "t": time.time(), **{k: _jsonable(v) for k, v in scalars.items()}}
        row.update(self._write_comm())
        self._metrics.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._write_comm()
        self._metrics.close()
        self._comm.close()


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the real model in .module


def grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the gradient of each layer (module owning parameters), keyed 'grad/<layer>'."""
    named = [(name, p.grad) for name, p in _unwrap(model).named_parameters() if p.grad is not None]
    if not named:
        return {}
    norms = torch._foreach_norm([grad.detach() for _, grad in named])  # one fused kernel, as clip_grad_norm_
    layers: dict[str, float] = {}
    for (name, _), norm in zip(named, torch.stack(norms).float().tolist()):  # one device sync
        layer = "grad/" + (name.rsplit(".", 1)[0] if "." in name else name)
        layers[layer] = layers.get(layer, 0.0) + norm**2
    return {layer: math.sqrt(square) for layer, square in layers.items()}


class Drift:
    """This rank's L2 distance to the mean of all replicas' parameters, measured without stalling.

    The all-reduce of the parameters starts at once and runs while training goes on; `value()` waits
    for it. It is a collective: every rank must measure at the same point. Its traffic is overhead.
    """

    def __init__(self, model: nn.Module, comm: Comm):
        params = [p.detach() for p in _unwrap(model).parameters()]
        self._flat = torch.nn.utils.parameters_to_vector(params).clone()
        self._sum = self._flat.clone()
        self._pending = comm.all_reduce_async(self._sum, tag=OVERHEAD_TAG)

    def value(self) -> float:
        self._pending.wait()
        return (self._flat - self._sum / torch.distributed.get_world_size()).norm().item()
