"""Checkpoints: every k steps each rank saves model, optimizer, data position and RNG; a restarted job
resumes from the last step that *every* rank finished saving.

A file is written under a temporary name and renamed into place (atomic on POSIX), so a rank killed
mid-save leaves the previous checkpoint intact, never half a file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

NAME = re.compile(r"rank(\d+)-step(\d+)\.pt$")


def checkpoint_path(folder: str | os.PathLike, rank: int, step: int) -> Path:
    return Path(folder) / f"rank{rank}-step{step:07d}.pt"


def save_atomically(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def saved_steps(folder: str | os.PathLike) -> dict[int, set[int]]:
    """{step: ranks that saved it} for the checkpoints in folder."""
    steps: dict[int, set[int]] = {}
    for path in Path(folder).glob("rank*-step*.pt"):
        if match := NAME.match(path.name):
            steps.setdefault(int(match[2]), set()).add(int(match[1]))
    return steps


def latest_complete_step(folder: str | os.PathLike, world_size: int) -> int | None:
    """The newest step for which all world_size ranks have a checkpoint, or None."""
    complete = [step for step, ranks in saved_steps(folder).items() if len(ranks) == world_size]
    return max(complete, default=None)


class Checkpointer:
    """One rank's checkpoints in `folder`: `restore` at start, `save` after each step.

    The state saved is what makes the rest of training identical to an uninterrupted run: parameters,
    optimizer state (momentum, Adam moments), the next step (our data position: batches are drawn by
    step) and torch's RNG state.
    """

    def __init__(self, folder: str | os.PathLike, rank: int, world_size: int, every: int, keep: int = 2):
        if every < 1:
            raise ValueError(f"every must be a number of steps >= 1, got {every!r}")
        self.folder, self.rank, self.world_size, self.every, self.keep = Path(folder), rank, world_size, every, keep

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Load the last complete checkpoint into model and optimizer; return the step to continue from."""
        step = latest_complete_step(self.folder, self.world_size)
        if step is None:
            return 0
        state = torch.load(checkpoint_path(self.folder, self.rank, step), weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        return state["next_step"]

    def save(self, next_step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Save if next_step is a multiple of `every`; keep only the newest `keep` of this rank's files."""
        if next_step % self.every:
            return False
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "next_step": next_step, "rng": torch.get_rng_state()}
        save_atomically(state, checkpoint_path(self.folder, self.rank, next_step))
        mine = sorted(step for step, ranks in saved_steps(self.folder).items() if self.rank in ranks)
        for old in mine[:-self.keep]:
            checkpoint_path(self.folder, self.rank, old).unlink(missing_ok=True)
        return True
