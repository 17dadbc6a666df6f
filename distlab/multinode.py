"""Beyond one machine: the same functions under torchrun, one agent per machine (node).

On a cluster each machine runs `torchrun_command(...)` with the same endpoint; here `run_local_nodes`
starts several agents on this machine, on loopback, which is the real multi-node code path (c10d
rendezvous, one process group across agents) without the second computer.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from .ranks import _loopback_interface
from .runs import Run, runs_folder

LOOPBACK = "127.0.0.1"
MARKER = "DISTLAB_NODES"  # every agent and worker of one run_local_nodes call carries MARKER=<its token>
AGENT = "import sys; from distlab.multinode import _agent; _agent(sys.argv[1:])"


def torchrun_command(function: str, nnodes: int, nproc_per_node: int, endpoint: str, job_id: str = "distlab",
                     max_restarts: int = 0, **kwargs) -> list[str]:
    """The command every node runs: `python -m torch.distributed.run ... -m distlab run module:fn --k v`.
    On a cluster its c10d store must be reachable from the other machines, so it listens on every interface."""
    args = [part for key, value in kwargs.items()
            for part in (f"--{key.replace('_', '-')}", value if isinstance(value, str) else repr(value))]
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={job_id}",
            f"--max-restarts={max_restarts}", "-m", "distlab", "run", function, *args]


def run_local_nodes(function: str, nnodes: int = 2, nproc_per_node: int = 2, max_restarts: int = 0,
                    runs_root: str | os.PathLike | None = None, timeout: float = 300, **kwargs) -> Run:
    """Start `nnodes` torchrun agents here, wait for all, return the run that finished (status ok).

    Loopback only: the agents meet through a file store in a folder only this user can open (no socket),
    node 0's agent hosts the workers' TCPStore on a socket bound to 127.0.0.1 (`_agent_store_on_loopback`),
    and the workers' gloo and TensorPipe sockets go on the loopback interface (GLOO_SOCKET_IFNAME,
    TP_SOCKET_IFNAME). Loopback is not private: another local user can still connect to that TCPStore
    and to gloo's ports (torch has no authentication for either). If this machine has no loopback
    interface named lo/lo0, gloo picks its own interface.

    Nothing outlives the call: on timeout, error or Ctrl-C every agent and worker is killed (found by
    walking the process tree and by the MARKER in their environment), and if this process dies, even
    by SIGKILL, each agent sees its lifeline pipe close and kills itself with its workers.
    """
    root = runs_folder(runs_root).resolve()
    folder = tempfile.mkdtemp(prefix="distlab-nodes-")  # mode 0700: the agents' rendezvous file
    token = secrets.token_hex(8)
    command = torchrun_command(function, nnodes, nproc_per_node, os.path.join(folder, "rendezvous"),
                               f"distlab-{token}", max_restarts, runs_root=str(root), **kwargs)
    started = time.time()
    logs = [tempfile.TemporaryFile("w+") for _ in range(nnodes)]  # files, not pipes: a full pipe blocks an agent
    agents: list[subprocess.Popen] = []
    deadline = time.monotonic() + timeout
    read_end, lifeline = os.pipe()  # each agent holds the read end; only this process the write end
    try:
        for log in logs:
            agents.append(_start_agent(command, log, token, read_end))
        while any(agent.poll() is None for agent in agents) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        _kill_all([agent.pid for agent in agents], token)
        for agent in agents:
            agent.wait()
        os.close(read_end)
        os.close(lifeline)
        shutil.rmtree(folder, ignore_errors=True)
    codes = [agent.returncode for agent in agents]
    if any(codes):
        tails = "\n".join(f"--- node {i} ---\n{_tail(log)}" for i, log in enumerate(logs))
        why = f"did not finish within {timeout:.0f} s" if time.monotonic() >= deadline else f"failed ({codes})"
        raise RuntimeError(f"torchrun {why}:\n{tails}")
    runs = [Run(p.parent) for p in root.glob("*/config.json") if p.stat().st_mtime >= started]
    return max((run for run in runs if run.status == "ok"), key=lambda run: run.dir.stat().st_mtime)


def _start_agent(command: list[str], log, token: str, lifeline: int) -> subprocess.Popen:
    """One torchrun agent, through `_agent`: file rendezvous, workers' store and sockets on loopback, and
    the `lifeline` pipe's read end, whose closing tells it the launcher is gone."""
    agent = [sys.executable, "-c", AGENT, str(lifeline), "--rdzv-conf=store_type=file", f"--local-addr={LOOPBACK}",
             *command[3:]]  # command[:3] is `python -m torch.distributed.run`
    env = dict(os.environ, **{MARKER: token})
    loopback = _loopback_interface()
    if loopback:
        env.update(GLOO_SOCKET_IFNAME=loopback, TP_SOCKET_IFNAME=loopback)  # gloo's and rpc's TensorPipe's
    return subprocess.Popen(agent, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=(lifeline,),
                            start_new_session=True)


def _agent(argv: list[str]) -> None:
    """An agent's process: `argv` is the lifeline's fd, then torchrun's arguments. Watch the lifeline,
    keep node 0's store on loopback, then run torchrun's agent here."""
    threading.Thread(target=_end_when_closed, args=(int(argv[0]),), daemon=True).start()
    _agent_store_on_loopback()
    from torch.distributed.run import main

    main(argv[1:])


def _end_when_closed(lifeline: int) -> None:
    """Block on the lifeline; at EOF (the launcher closed it or died, even by SIGKILL) kill this agent's
    workers and everything carrying this run's marker, then this process."""
    try:
        while os.read(lifeline, 1):
            pass
    except OSError:
        pass  # a broken lifeline counts as a closed one
    _kill_all([os.getpid()], os.environ.get(MARKER, ""))
    os.kill(os.getpid(), signal.SIGKILL)


def _agent_store_on_loopback() -> None:
    """Node 0's agent hosts a TCPStore for all workers, and TCPStore binds every interface ('::') whatever
    host it is given. Replace torch's factory (torch 2.13's DynamicRendezvousHandler._create_tcp_store_server)
    with one that hands TCPStore a socket already bound to 127.0.0.1 (its master_listen_fd)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    if not hasattr(DynamicRendezvousHandler, "_create_tcp_store_server"):
        raise RuntimeError(f"torch {torch.__version__}: cannot keep torchrun's agent store on loopback")

    def create(handler, master_addr: str, master_port: int) -> dist.TCPStore:
        listener = socket.create_server((LOOPBACK, master_port))
        return dist.TCPStore(LOOPBACK, listener.getsockname()[1], is_master=True, multi_tenant=True,
                             master_listen_fd=listener.detach())

    DynamicRendezvousHandler._create_tcp_store_server = create


def _kill_all(roots: list[int], token: str, within: float = 5.0) -> None:
    """SIGKILL `roots`, their descendants and every process whose environment has MARKER=token (but this
    process), until none is left. Each round reads the whole table before killing, so a killed parent's
    children are already known; the marker finds workers that left the tree (torchrun puts each in its own
    session, and an agent's death re-parents them). Without /proc (not Linux), kill the roots' groups."""
    if not os.path.isdir("/proc"):
        for pid in roots:
            _kill(os.killpg, pid)
        return
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        victims = _doomed(_process_table(token.encode()), set(roots)) - {os.getpid()}
        if not victims:
            return
        for pid in victims:
            _kill(os.kill, pid)
        time.sleep(0.02)


def _doomed(table: dict[int, tuple[int, bool]], roots: set[int]) -> set[int]:
    """The live pids of `table` ({pid: (parent, marked)}) that are roots, under roots, or marked."""
    doomed = {pid for pid in roots if pid in table} | {pid for pid, (_, marked) in table.items() if marked}
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in doomed:
                doomed.add(child)
                stack.append(child)
    return doomed


def _process_table(token: bytes) -> dict[int, tuple[int, bool]]:
    """{pid: (parent pid, carries MARKER=token)} of every live (not zombie) process, read from /proc."""
    table = {}
    mark = f"{MARKER}=".encode() + token + b"\0"
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                state, parent = f.read().rsplit(b")", 1)[1].split()[:2]
            if state != b"Z":
                table[int(name)] = (int(parent), bool(token) and _environ_has(name, mark))
        except (OSError, ValueError):
            pass  # gone meanwhile
    return table


def _environ_has(pid: str, mark: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return (b"\0" + f.read()).find(b"\0" + mark) >= 0
    except OSError:  # another user's process, or gone
        return False


def _kill(kill, pid: int) -> None:
    try:
        kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(log, chars: int = 3000) -> str:
    log.seek(0)
    return log.read()[-chars:]
