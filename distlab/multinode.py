"""Beyond one machine: the same functions under torchrun, one agent per machine (node).

On a cluster each machine runs `torchrun_command(...)` with the same endpoint; here `run_local_nodes`
starts several agents on this machine, on loopback, which is the real multi-node code path (c10d
rendezvous, one process group across agents) without the second computer.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time

from .ranks import free_port
from .runs import Run, runs_folder


def torchrun_command(function: str, nnodes: int, nproc_per_node: int, endpoint: str, job_id: str = "distlab",
                     max_restarts: int = 0, **kwargs) -> list[str]:
    """The command every node runs: `python -m torch.distributed.run ... -m distlab run module:fn --k v`."""
    args = [part for key, value in kwargs.items()
            for part in (f"--{key.replace('_', '-')}", value if isinstance(value, str) else repr(value))]
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={job_id}",
            f"--max-restarts={max_restarts}", "-m", "distlab", "run", function, *args]


def run_local_nodes(function: str, nnodes: int = 2, nproc_per_node: int = 2, max_restarts: int = 0,
                    runs_root: str | os.PathLike | None = None, timeout: float = 300, **kwargs) -> Run:
    """Start `nnodes` torchrun agents here, wait for all, return the run that finished (status ok)."""
    root = runs_folder(runs_root).resolve()
    endpoint = f"127.0.0.1:{free_port()}"
    command = torchrun_command(function, nnodes, nproc_per_node, endpoint, f"distlab-{secrets.token_hex(4)}",
                               max_restarts, runs_root=str(root), **kwargs)
    started = time.time()
    logs = [tempfile.TemporaryFile("w+") for _ in range(nnodes)]  # files, not pipes: a full pipe blocks an agent
    agents = [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
              for log in logs]
    deadline = time.monotonic() + timeout
    try:
        while any(agent.poll() is None for agent in agents) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    codes = [agent.returncode for agent in agents]
    if any(codes):
        tails = "\n".join(f"--- node {i} ---\n{_tail(log)}" for i, log in enumerate(logs))
        why = f"did not finish within {timeout:.0f} s" if time.monotonic() >= deadline else f"failed ({codes})"
        raise RuntimeError(f"torchrun {why}:\n{tails}")
    runs = [Run(p.parent) for p in root.glob("*/config.json") if p.stat().st_mtime >= started]
    return max((run for run in runs if run.status == "ok"), key=lambda run: run.dir.stat().st_mtime)


def _tail(log, chars: int = 3000) -> str:
    log.seek(0)
    return log.read()[-chars:]
