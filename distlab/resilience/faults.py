"""Fault injection: kill rank r at step k, slow rank r by x ms — planned in advance, or ordered live.

Ranks call `faults.step_delay(ctx)` inside their compute and `faults.after_step(ctx, step)` after each
step. Live orders come from a `FaultControl` in the launching process (the notebook's chaos panel)
through a torch.distributed TCPStore: a real network channel the ranks poll each step, no restart.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist


@dataclass
class Faults:
    """What to break. kill_at {rank: step}: that rank dies (SIGKILL, no goodbye) after that step, on the
    first attempt only, so a restarted job can get past it. slow_ms {rank: ms}: extra time per step.
    control: "host:port" of a FaultControl for live orders."""

    kill_at: dict[int, int] = field(default_factory=dict)
    slow_ms: dict[int, float] = field(default_factory=dict)
    control: str | None = None

    def __post_init__(self):
        self._store = None

    def __getstate__(self):  # the store connection stays behind; each rank opens its own
        return {k: v for k, v in self.__dict__.items() if k != "_store"}

    def __setstate__(self, state):
        self.__dict__.update(state, _store=None)

    def step_delay(self, ctx) -> float:
        """Seconds this rank should stall this step (the planned delay, or the live order if any)."""
        live = self._order(f"slow/{ctx.rank}")
        ms = float(live) if live is not None else self.slow_ms.get(ctx.rank, 0.0)
        return ms / 1000

    def after_step(self, ctx, step: int) -> None:
        """Die here if planned (first attempt) or ordered."""
        planned = ctx.attempt == 0 and self.kill_at.get(ctx.rank) == step
        ordered = self._order(f"kill/{ctx.rank}") is not None
        if ordered:
            self._store.delete_key(f"kill/{ctx.rank}")  # one order, one death: the restart must survive
        if planned or ordered:
            print(f"fault injected: rank {ctx.rank} killed after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def _order(self, key: str) -> str | None:
        if self.control is None:
            return None
        if self._store is None:
            host, port = self.control.rsplit(":", 1)
            self._store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=10))
        return self._store.get(key).decode() if self._store.check([key]) else None


class FaultControl:
    """Serves live fault orders to running ranks: a TCPStore listening on 127.0.0.1 only (unless host
    is given), in the process that launched them."""

    def __init__(self, host: str = "127.0.0.1"):
        self._socket = socket.create_server((host, 0))  # bound first, so the store listens only there
        port = self._socket.getsockname()[1]
        self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                                   master_listen_fd=self._socket.fileno(), timeout=timedelta(seconds=10))
        self.address = f"{host}:{port}"

    def faults(self, **planned) -> Faults:
        """A Faults that also obeys this control's live orders; pass it to the training function."""
        return Faults(**planned, control=self.address)

    def slow(self, rank: int, ms: float) -> None:
        self.store.set(f"slow/{rank}", str(float(ms)))

    def heal(self, rank: int) -> None:
        self.store.set(f"slow/{rank}", "0")

    def kill(self, rank: int) -> None:
        self.store.set(f"kill/{rank}", "1")

    def wait_until_taken(self, rank: int, timeout: float = 30.0) -> bool:
        """True once rank has taken its kill order (the key is gone)."""
        deadline = time.monotonic() + timeout
        while self.store.check([f"kill/{rank}"]):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True
