"""Consistency models for training: BSP, SSP and ASP as one parameter server with a staleness bound s.

A worker's clock counts its pushes. Under the bound s a worker may read the parameters only while it
is at most s clocks ahead of the slowest live worker (Ho et al. 2013, "More Effective Distributed ML
via a Stale Synchronous Parallel Parameter Server"):
- s = 0: BSP (bulk synchronous parallel; strong): everyone reads the same step's parameters.
- 0 < s < inf: SSP (stale synchronous parallel; bounded staleness, weak).
- s = inf: ASP (asynchronous parallel; eventual): nobody ever waits, staleness is unbounded.
The machinery is the parameter server's (architectures/parameter_server.py); this module names the
knob and reads the measurements back.
"""

from __future__ import annotations

import math

from . import parameter_server


@parameter_server.needs_gloo(parameter_server.ANY_SOURCE)
def train(ctx, staleness: float = 0, **options) -> dict:
    """Train the digits MLP under staleness bound `staleness` (0 BSP, integer SSP, math.inf ASP).

    Rank 0 is the server (`servers=k` for k of them), the other ranks are workers. Options as
    `parameter_server.Config` (steps, lr, seed; slow_rank: a straggler that sleeps `delay` seconds per step;
    jitter: every worker sleeps `delay` at a step with this probability; batch, crash_rank, crash_at,
    failure_timeout, shard, hidden). Returns this rank's record:
    - worker: {"role": "worker", "steps": {"step", "t", "loss", "clock_staleness", "wait"} as lists,
      "wall_s", "crashed_at"}; t is seconds since the common start.
    - server: {"role": "server", "updates": {"t", "worker", "clock", "version", "version_staleness",
      "clock_staleness"} as lists (one entry per applied push), "pulls", "events", "bytes_in",
      "bytes_out", "messages", "busy_s", "params", "range", "version"}.
    """
    return parameter_server.run(ctx, staleness=staleness, **options)


def label(staleness: float) -> str:
    """'BSP (s=0)', 'SSP (s=2)' or 'ASP (s=inf)'."""
    if staleness == 0:
        return "BSP (s=0)"
    return "ASP (s=inf)" if staleness == math.inf else f"SSP (s={staleness})"


def measured_staleness(results: list[dict]) -> list[int]:
    """Clock staleness of every applied update, over all servers: each is at most the bound s."""
    return [g for r in results if r["role"] == "server" for g in r["updates"]["clock_staleness"]]


def wall_time(results: list[dict]) -> float:
    """Seconds until the last worker finished its steps."""
    return max(r["wall_s"] for r in results if r["role"] == "worker")
