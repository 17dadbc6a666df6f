"""Fault injection: kill rank r at step k, slow rank r by x ms — planned in advance, or ordered live.

Ranks call `faults.step_delay(ctx)` inside their compute and `faults.after_step(ctx, step)` after each
step. Live orders come from a `FaultControl` in the launching process (the notebook's chaos panel)
through a torch.distributed FileStore the ranks poll each step, no restart. It is a file in a folder only
this user can open (0700; the file 0600), not a TCPStore: any local user could write to one of those, and
kill or slow another student's ranks.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import weakref
from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass
class Faults:
    """What to break. kill_at {rank: step}: that rank dies (SIGKILL, no goodbye) after that step, on the
    first attempt only, so a restarted job can get past it. slow_ms {rank: ms}: extra time per step;
    every_rank_ms: the same for every rank slow_ms leaves out, whatever the world size.
    control: the order file of a FaultControl (its `address`), for live orders."""

    kill_at: dict[int, int] = field(default_factory=dict)
    slow_ms: dict[int, float] = field(default_factory=dict)
    every_rank_ms: float = 0.0
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
        ms = float(live) if live is not None else self.slow_ms.get(ctx.rank, self.every_rank_ms)
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
        if self.control is None or not os.path.exists(self.control):  # no control, or closed since
            return None
        if self._store is None:
            self._store = dist.FileStore(self.control, -1)  # -1: any number of readers, the file stays
        return self._store.get(key).decode() if self._store.check([key]) else None


class FaultControl:
    """Serves live fault orders to running ranks on this machine: a FileStore whose file (`address`, mode
    0600) lies in a folder of its own (mode 0700), removed by close(), `with`, or when garbage collected.
    No socket: only this user can give orders."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="distlab-faults-")  # mode 0700
        self.address = os.path.join(self.folder, "orders")
        os.close(os.open(self.address, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # 0600 before any write
        self.store = dist.FileStore(self.address, -1)
        self._remove = weakref.finalize(self, shutil.rmtree, self.folder, True)

    def close(self) -> None:
        """Remove the order file and its folder; ranks still polling it get no more orders."""
        self._remove()

    def __enter__(self) -> FaultControl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
