"""Distributed reinforcement learning (notebook 10): the actor-learner split on ranks and on Ray."""

from __future__ import annotations

RAY_MISSING = ("Ray is not installed, so the Ray sections of this notebook are skipped; the torch.distributed "
               "ones run as usual. To run them too: pip install 'distlab[ray]' (or pip install 'ray>=2.9'), "
               "then restart the kernel.")


def ray_engine():
    """distlab.rl.on_ray when Ray is installed; otherwise None, after printing how to install it (Ray is the
    optional `[ray]` extra: a notebook without it still runs its torch.distributed half)."""
    try:
        from . import on_ray
    except ModuleNotFoundError as error:
        if error.name != "ray":
            raise
        print(RAY_MISSING)
        return None
    return on_ray


def skipped(what: str) -> None:
    """Say that a Ray cell did nothing, and why."""
    print(f"Skipped ({what}): Ray is not installed. pip install 'distlab[ray]' runs it.")
