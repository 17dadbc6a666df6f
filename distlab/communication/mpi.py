"""MPI itself: mpi4py over MPICH (both from PyPI), started by `mpiexec` from a notebook cell.

MPI (the Message Passing Interface, https://www.mpi-forum.org/docs/) is where torch.distributed's
vocabulary comes from: ranks, a communicator (process group), Send/Recv, Bcast, Allreduce. Its
implementations carry decades of tuning for one machine (shared memory) and for clusters. Here the
same all-reduce runs under real MPI processes, started the MPI way: `mpiexec -n 2 python mpi.py
<task>` (this file) — a launcher of its own, not dl.launch, and no torch.distributed.

On a shared server (DESIGN.md): the fork-only launcher (`mpiexec.gforker`) opens no port, and MPICH is
told to use shared memory only between its ranks (libfabric's shm provider), so nothing listens on any
interface; MPICH's own shared-memory segment is a 0600 file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MARK = "distlab-mpi "  # the line rank 0 prints every rank's result on
ONE_MACHINE = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "shm"}  # no sockets between local ranks


def mpiexec() -> str:
    """The fork-only mpiexec that the mpich wheel installs beside this Python."""
    path = Path(sys.executable).parent / "mpiexec.gforker"
    if not path.exists():
        raise RuntimeError("MPI is not installed in this environment: pip install mpi4py mpich "
                           "(or pip install -e '.[dev]', which brings them)")
    return str(path)


def run(task: str, world_size: int = 2, timeout: float = 120, **args) -> list[dict]:
    """Run `task` (one of TASKS) on `world_size` MPI processes; returns each rank's result, by rank."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
    # The file itself, not `-m distlab...`: the MPI ranks import neither torch nor distlab (seconds each).
    argv = [mpiexec(), "-n", str(world_size), sys.executable, __file__, task, json.dumps(args)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_MACHINE}, start_new_session=True)
    try:
        output, errors = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and its ranks share the session's group
        proc.communicate()
        raise TimeoutError(f"mpiexec -n {world_size} ({task}) did not finish within {timeout} s") from None
    lines = [line[len(MARK):] for line in output.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"mpiexec -n {world_size} ({task}) failed (exit {proc.returncode}):\n"
                           f"{(output + errors)[-3000:]}")
    return json.loads(lines[0])


# -- what the MPI ranks run (imports mpi4py, so only inside them) -----------------------------------

def hello(comm) -> dict:
    """Each rank contributes rank+1 to an Allreduce and rank 0's token to a Bcast: the sum is N(N+1)/2."""
    import numpy as np
    from mpi4py import MPI

    mine, total = np.full(4, comm.rank + 1.0), np.empty(4)
    comm.Allreduce(mine, total, op=MPI.SUM)
    token = comm.bcast("from rank 0" if comm.rank == 0 else None, root=0)
    library = MPI.Get_library_version().split("\n")[0]
    return {"size": comm.size, "sum": total.tolist(), "token": token, "library": library}


def time_allreduce(comm, sizes: list[int], repeats: int = 5) -> dict:
    """Seconds of MPI's Allreduce (in place, float32) per size in bytes: the slowest rank's median."""
    import numpy as np
    from mpi4py import MPI

    rows = []
    for size in sizes:
        buffer = np.ones(max(1, size // 4), dtype=np.float32)
        times = []
        for _ in range(repeats):
            comm.Barrier()
            start = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
            times.append(time.perf_counter() - start)
        seconds = comm.allreduce(sorted(times)[repeats // 2], op=MPI.MAX)
        rows.append({"algorithm": "mpi", "bytes": buffer.nbytes, "world_size": comm.size, "seconds": seconds,
                     "calls": repeats})
    return {"rows": rows}


TASKS = {"hello": hello, "time_allreduce": time_allreduce}


def main() -> None:
    from mpi4py import MPI

    task, args = sys.argv[1], json.loads(sys.argv[2])
    comm = MPI.COMM_WORLD
    results = comm.gather({"rank": comm.rank, **TASKS[task](comm, **args)}, root=0)
    if comm.rank == 0:  # one line from one process: ranks sharing a pipe would interleave theirs
        print(MARK + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
