"""Beyond one machine: the same functions under torchrun, one agent per machine (node).

On a cluster each machine runs `torchrun_command(...)` with the same endpoint; here `run_local_nodes`
starts several agents on this machine, on loopback, which is the real multi-node code path (c10d
rendezvous, one process group across agents) without the second computer.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .runs import RUNS_ROOT_ENV, Run


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
    root = Path(runs_root or os.environ.get(RUNS_ROOT_ENV, "runs")).resolve()
    endpoint = f"127.0.0.1:{_free_port()}"
    command = torchrun_command(function, nnodes, nproc_per_node, endpoint, f"distlab-{secrets.token_hex(4)}",
                               max_restarts, runs_root=str(root), **kwargs)
    started = time.time()
    agents = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True) for _ in range(nnodes)]
    try:
        outputs = [agent.communicate(timeout=timeout)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    if any(agent.returncode for agent in agents):
        tails = "\n".join(f"--- node {i} ---\n{out[-3000:]}" for i, out in enumerate(outputs))
        raise RuntimeError(f"torchrun failed (exit codes {[a.returncode for a in agents]}):\n{tails}")
    finished = [Run(p.parent) for p in root.glob("*/config.json")
                if p.stat().st_mtime >= started and Run(p.parent).status == "ok"]
    return max(finished, key=lambda run: run.dir.stat().st_mtime)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
