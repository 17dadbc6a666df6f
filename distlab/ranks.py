"""The warm ranks: N spawned `python -m distlab.worker` processes sharing one process group.

Each rank leads its own process group (so killing it kills what it started), reads commands from a
pipe only this process holds (so it ends itself when we die), and reports on another. Its stdout and
stderr are read line by line by threads into one queue, for the launcher to print and log. What
travels on the two pipes is defined once, below: the launcher sends `Job` or `Exit`; a rank answers
`Ready` once, then `Done` or `Failed` per job.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import Pipe

import torch

JOB_END = "\x00distlab-job-end"  # a rank writes it on stdout and stderr after each job: "all output is in"
LINE_LIMIT = 16 * 2**10  # a longer line arrives in pieces of this many bytes
QUEUE_LIMIT = 2000  # lines waiting for the launcher (all ranks): a flooding rank cannot fill its memory
BACKENDS = ("auto", "gloo", "nccl")
STACKS_SIGNAL = signal.SIGUSR1  # "write your threads' stacks into the run folder" (worker.py)


@dataclass(frozen=True)
class Placement:
    backend: str
    devices: tuple[str, ...]
    summary: str


@dataclass(frozen=True)
class PoolShape:
    """What makes warm ranks reusable: a launch with the same shape runs on the same processes."""

    world_size: int
    placement: Placement
    threads: int


# -- the pipe protocol between the launcher (launch.py) and a rank (worker.py) ---------------------------

@dataclass(frozen=True)
class Job:
    """Launcher -> rank: run the cloudpickled (fn, kwargs) with this run folder."""

    payload: bytes
    run_dir: str
    sources: dict[str, list[str]]  # the text of notebook cells, so tracebacks can show their lines
    attempt: int  # 0 on the first try, n after n restarts
    modules: dict[str, tuple[int, int]]  # the user's own modules: (mtime_ns, size) of each file now


@dataclass(frozen=True)
class Exit:
    """Launcher -> rank: leave now."""


@dataclass(frozen=True)
class Ready:
    """Rank -> launcher, once: joined the process group."""

    rank: int
    pid: int
    device: str
    threads: int


@dataclass(frozen=True)
class Done:
    """Rank -> launcher: the job returned and its result is saved."""

    rank: int


@dataclass(frozen=True)
class Failed:
    """Rank -> launcher (or made by the launcher when a rank died): why this rank's job ended."""

    rank: int
    at: float  # time.time() of the failure: the earliest real one is the root cause
    details: str  # the traceback, or how the process died
    symptom: bool  # a broken collective after a peer went away, not a root cause


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def needs_gloo(reason: str):
    """Mark a rank function NCCL cannot run, saying why (e.g. "it receives from any source"):
    backend="auto" then picks gloo for it (over CUDA tensors where there are GPUs); "nccl" is refused."""
    def mark(fn):
        fn.needs_gloo = reason
        return fn

    return mark


def gloo_reason(fn) -> str | None:
    """Why `fn` (or the function a functools.partial wraps) needs gloo, or None."""
    return getattr(fn, "needs_gloo", None) or getattr(getattr(fn, "func", None), "needs_gloo", None)


class WorldSizeError(ValueError):
    """A rank function refused a world size before any rank started; the message lists the sizes that work."""


def world_sizes(works, why: str):
    """Mark a rank function that runs only on some world sizes: `works(world_size, **kwargs)` says whether
    one does, `why` says what decides it ("a dp x tp mesh needs dp·tp ranks"). dl.launch refuses the others
    before starting a process."""
    def mark(fn):
        fn.world_sizes = (works, why)
        return fn

    return mark


def check_world_size(fn, world_size: int, kwargs: dict, most: int = 16) -> None:
    """Raise WorldSizeError if `fn` (or the function a functools.partial wraps) cannot run on world_size."""
    rule = getattr(fn, "world_sizes", None) or getattr(getattr(fn, "func", None), "world_sizes", None)
    if rule is None:
        return
    works, why = rule
    kwargs = {**getattr(fn, "keywords", {}), **kwargs}  # a functools.partial's own arguments count too
    if works(world_size, **kwargs):
        return
    sizes = [n for n in range(1, most + 1) if works(n, **kwargs)]
    shown = ", ".join(map(str, sizes)) if sizes else f"none up to {most}"
    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "this function")
    raise WorldSizeError(f"{name} cannot run on {world_size} rank(s): {why}. With these arguments it runs on: "
                         f"{shown}.")


def place(world_size: int, backend: str = "auto", needs_gloo: str | None = None) -> Placement:
    """Which backend and device each rank gets: one GPU per rank (NCCL) when there are enough,
    ranks sharing the GPUs over gloo when there are fewer, CPU over gloo otherwise. A function that
    `needs_gloo` gets gloo over the GPUs, one per rank where there are enough."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    gpus = gpu_count()
    if backend == "nccl" and needs_gloo:
        raise ValueError(f"backend='nccl' cannot run this function: {needs_gloo}. Use backend='auto' (gloo, "
                         "over CUDA tensors where there are GPUs) or backend='gloo'.")
    if backend == "nccl" and gpus < world_size:
        raise ValueError(
            f"backend='nccl' needs one GPU per rank: {world_size} ranks, {gpus} GPU(s) here. "
            "Use backend='auto' (gloo on CPU, or ranks sharing GPUs) or a smaller world_size."
        )
    if gpus >= world_size and backend != "gloo" and not needs_gloo:
        return Placement("nccl", tuple(f"cuda:{r}" for r in range(world_size)), "one GPU per rank, NCCL")
    if gpus:
        devices = tuple(f"cuda:{r % gpus}" for r in range(world_size))
        shared = f"{world_size} ranks sharing {gpus} GPU(s)" if gpus < world_size else "one GPU per rank"
        return Placement("gloo", devices, f"{shared} over gloo" + (f" ({needs_gloo})" if needs_gloo else ""))
    return Placement("gloo", ("cpu",) * world_size, "CPU, gloo")


def default_threads(world_size: int) -> int:
    """torch intra-op threads per rank: the cores shared out; oversubscription makes small CPUs crawl."""
    return max(1, len(os.sched_getaffinity(0)) // world_size)


@contextmanager
def one_thread():
    """Run the block with one torch thread, then restore the count: on a few shared cores a thread pool's
    contention costs more than it gains (warm ranks and the notebook keep their own count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rendezvous(folder: str) -> str:
    """Where the ranks meet. By default a file in a folder only this user can read: a TCP store would
    listen on every interface. MASTER_ADDR set by the user means they want TCP on that address."""
    if "MASTER_ADDR" in os.environ:
        return f"tcp://{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT') or free_port()}"
    return f"file://{os.path.join(folder, 'store')}"


def _loopback_interface() -> str | None:
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)


def _rank_environment(threads: int) -> dict:
    env = dict(os.environ)
    # Whatever the launcher can import (the notebook's folder, the tests), the ranks can too.
    paths = [os.getcwd() if p == "" else p for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = str(threads)
    loopback = _loopback_interface()
    if "MASTER_ADDR" not in os.environ and loopback:
        for sockets in ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME"):  # gloo's and rpc's TensorPipe's
            env.setdefault(sockets, loopback)  # own sockets stay on this machine too
    return env


class RankPool:
    """N warm ranks that share one process group, with their pipes and output readers."""

    def __init__(self, shape: PoolShape):
        self.shape = shape
        self.world_size = shape.world_size
        self.output: queue.Queue = queue.Queue()  # (rank, stream name, line or None for JOB_END)
        self.dropped = [0] * shape.world_size  # lines a rank printed while the queue was full
        self.stderr_tail = [deque(maxlen=40) for _ in range(shape.world_size)]
        self.procs: list[subprocess.Popen] = []
        self.commands, self.reports, self._readers = [], [], []
        self._folder = tempfile.mkdtemp(prefix="distlab-ranks-")  # mode 0700
        try:
            env, rendezvous = _rank_environment(shape.threads), _rendezvous(self._folder)
            for rank in range(shape.world_size):
                self._start(rank, env, rendezvous)
        except BaseException:  # Ctrl-C, EMFILE, ... while starting rank k: end the k already started
            self.kill()
            raise

    def _start(self, rank: int, env: dict, rendezvous: str) -> None:
        cmd_read, cmd_write = Pipe(duplex=False)
        report_read, report_write = Pipe(duplex=False)
        argv = [sys.executable, "-m", "distlab.worker", f"--rank={rank}", f"--world-size={self.world_size}",
                f"--init-method={rendezvous}", f"--backend={self.shape.placement.backend}",
                f"--device={self.shape.placement.devices[rank]}", f"--threads={self.shape.threads}",
                f"--cmd-fd={cmd_read.fileno()}", f"--report-fd={report_write.fileno()}"]
        try:
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(cmd_read.fileno(), report_write.fileno()), start_new_session=True)
        except BaseException:
            cmd_write.close()
            report_read.close()
            raise
        finally:
            cmd_read.close()  # the rank's ends: only the rank holds them now
            report_write.close()
        self.procs.append(proc)
        self.commands.append(cmd_write)
        self.reports.append(report_read)
        for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            reader = threading.Thread(target=self._read, args=(rank, name, stream), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _read(self, rank: int, name: str, stream) -> None:
        """Queue the rank's lines; a line that ends without a newline before JOB_END still counts as one.
        While the launcher is behind (a rank printing as fast as it can), lines are counted, not queued."""
        for raw in iter(lambda: stream.readline(LINE_LIMIT), b""):
            line = raw.decode(errors="replace").rstrip("\n")
            ended = line.endswith(JOB_END)
            line = line[: -len(JOB_END)] if ended else line
            if line or not ended:
                if name == "stderr":
                    self.stderr_tail[rank].append(line)
                if self.output.qsize() < QUEUE_LIMIT:
                    self.output.put((rank, name, line))
                else:
                    self.dropped[rank] += 1
            if ended:
                self.output.put((rank, name, None))
        stream.close()

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def exit_description(self, rank: int) -> str:
        code = self.procs[rank].wait(timeout=5)
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        tail = "\n".join(self.stderr_tail[rank]) or "(nothing on stderr)"
        return f"the process {how}. Last lines of its stderr:\n{tail}"

    def request_stacks(self, ranks) -> None:
        """Ask these ranks to write their Python stacks now (a hang's post-mortem; see worker.py)."""
        for rank in ranks:
            try:
                os.kill(self.procs[rank].pid, STACKS_SIGNAL)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL every rank's process group (the rank and whatever it started), then reap."""
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap()

    def close(self, grace: float = 3.0) -> None:
        """Ask the ranks to exit, kill whatever has not within `grace` seconds."""
        for conn in self.commands:
            try:
                conn.send(Exit())
            except OSError:
                pass
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def _reap(self) -> None:
        for proc in self.procs:
            proc.wait(timeout=10)
        for conn in self.commands + self.reports:
            conn.close()
        for reader in self._readers:
            reader.join(timeout=2)
        shutil.rmtree(self._folder, ignore_errors=True)
