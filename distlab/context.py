"""The `ctx` every training function receives: who this rank is, where it runs, how it reports."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import telemetry
from .comm import Comm, ddp_comm_hook
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
        self._drift_every = 0
        self._drift: tuple[int, telemetry.Drift] | None = None  # (step measured, in flight)

    def __repr__(self) -> str:
        return f"Context(rank={self.rank}, world_size={self.world_size}, device={self.device}, backend={self.backend})"

    def log(self, **scalars) -> None:
        """Record one row of scalars (e.g. step=3, loss=0.5); streamed to the notebook while running.

        With a watched model and a `step`, the row also gets per-layer gradient norms, and every
        `drift_every` steps the drift is measured (a collective: every rank must log the same steps).
        Its all-reduce overlaps the next step, so the drift of step s arrives in the next row, as
        `drift` with `drift_step` = s.
        """
        if self._watched is not None and "step" in scalars:
            scalars.update(telemetry.grad_norms(self._watched))
            if self._drift is not None:
                scalars["drift_step"], scalars["drift"] = self._drift[0], self._drift[1].value()
                self._drift = None
            if self._drift_every and scalars["step"] % self._drift_every == 0:
                self._drift = (scalars["step"], telemetry.Drift(self._watched, self.comm))
        self._telemetry.log(scalars)

    def watch(self, model: nn.Module, drift_every: int = 10) -> nn.Module:
        """Record gradient norms (and drift every `drift_every` logged steps; 0 turns it off) on each
        `ctx.log(step=...)`. A DistributedDataParallel model also gets a comm hook that counts its
        all-reduces."""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model.register_comm_hook(None, ddp_comm_hook(self._telemetry.record_comm))
        self._watched, self._drift_every = model, drift_every
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
