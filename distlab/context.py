"""The `ctx` every training function receives: who this rank is, where it runs, how it reports."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import telemetry
from .comm import Comm
from .runs import write_progress


class Context:
    """Rank identity plus telemetry. torch.distributed is already initialized when a function gets it."""

    def __init__(self, rank: int, world_size: int, device: torch.device, backend: str, run_dir: Path,
                 local_rank: int | None = None, attempt: int = 0):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = rank if local_rank is None else local_rank
        self.device = device
        self.backend = backend
        self.run_dir = Path(run_dir)
        self.attempt = attempt  # 0 on the first try; n after n restarts (dl.launch(restarts=) or torchrun)
        self._telemetry = telemetry.Telemetry(self.run_dir, rank)
        self.comm = Comm(self._telemetry.record_comm)
        self._watched: nn.Module | None = None
        self._norms: telemetry.GradNormMeter | None = None
        self._drift_every, self._norms_every = 0, 1
        self._drift: tuple[int, telemetry.Drift] | None = None  # (step measured, in flight)

    def __repr__(self) -> str:
        return f"Context(rank={self.rank}, world_size={self.world_size}, device={self.device}, backend={self.backend})"

    def log(self, **scalars) -> None:
        """Record one row of scalars (e.g. step=3, loss=0.5); streamed to the notebook while running.

        With a watched model and a `step`, the row also gets per-layer gradient norms (every `every`-th
        step, see `watch`), and every `drift_every` steps the drift is measured (a collective: every rank
        must log the same steps).
        Its all-reduce overlaps the next step, so the drift of step s arrives in the next row, as
        `drift` with `drift_step` = s.
        """
        norms = None
        if self._watched is not None and "step" in scalars:
            step = scalars["step"]
            if step % self._norms_every == 0:
                norms = self._norms.measure()
            if self._drift is not None:
                scalars["drift_step"], scalars["drift"] = self._drift[0], self._drift[1].value()
                self._drift = None
            if self._drift_every and step % self._drift_every == 0:
                self._drift = (step, telemetry.Drift(self._watched, self.comm))
        self._telemetry.log(scalars, norms)

    def watch(self, model: nn.Module, drift_every: int = 100, every: int = 1) -> nn.Module:
        """Record gradient norms on each `ctx.log(step=...)` whose step is a multiple of `every` (sampling:
        1 = every step), and the drift every `drift_every` logged steps (0 turns it off). Each drift
        all-reduces the whole model, as much as a DDP step moves: every 100 steps it adds 1% to DDP's
        traffic, every 10 steps 10%. A DistributedDataParallel model's all-reduces are counted too
        (telemetry.DDPTraffic): bytes, without a Python hook."""
        if every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            self._telemetry.ddp.count(model)
        self._watched, self._drift_every, self._norms_every = model, drift_every, every
        self._norms = telemetry.GradNormMeter(model)
        return model

    def drift(self, model: nn.Module) -> float:
        """Distance of this rank's parameters to the replicas' mean; its all-reduce counts as overhead."""
        return telemetry.Drift(model, self.comm).value()

    def set_total(self, steps: int) -> None:
        """Tell the progress bar how many steps to expect."""
        if self.rank == 0:
            write_progress(self.run_dir, steps)

    def finish(self) -> None:
        """After the function returned on every rank: log the drift still in flight, if any."""
        if self._drift is not None:
            step, drift = self._drift
            self._drift = None
            self._telemetry.log({"drift_step": step, "drift": drift.value()})

    def close(self) -> None:
        self._telemetry.close()
