"""One rank: `python -m distlab.worker ...`, started by dl.launch (never by hand).

The rank joins the process group once, reports ready, then runs the jobs it is sent, one after
another, so later launches skip Python start-up and `import torch`. Commands arrive on a pipe whose
other end only the launching process holds: when that process dies, the pipe closes and the rank
ends itself and everything it started (it leads its own process group).
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import importlib
import linecache
import os
import queue
import random
import shutil
import signal
import sys
import threading
import time
import traceback
from contextlib import nullcontext
from datetime import timedelta
from multiprocessing.connection import Connection

import cloudpickle
import numpy as np
import torch
import torch.distributed as dist
from torch.utils._device import DeviceContext, _device_constructors

from . import audit, telemetry
from .context import Context
from .ranks import JOB_END, STACKS_SIGNAL, Done, Failed, Job, Ready
from .runs import rank_file, save_result

COMM_ERROR_HINTS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket closed")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distlab.worker")
    for name in ("rank", "world-size", "threads", "cmd-fd", "report-fd"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--init-method", required=True)
    p.add_argument("--backend", required=True)
    p.add_argument("--device", required=True)
    return p.parse_args(argv)


def end_this_rank(scratch: str | None = None) -> None:
    """This rank and every process it started. Rank 0 also removes the pool's scratch folder, which
    nobody else will once the launcher is gone. What the job logged is written first: nothing logged is lost."""
    try:
        telemetry.flush_open()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        os.killpg(0, signal.SIGKILL)


def read_commands(commands: Connection, jobs: queue.Queue, scratch: str | None) -> None:
    while True:
        try:
            jobs.put(commands.recv())
        except (EOFError, OSError):  # the launching process is gone
            end_this_rank(scratch)


def scratch_folder(args: argparse.Namespace) -> str | None:
    """The pool's private rendezvous folder (ranks.py), for rank 0 to clean up."""
    if args.rank != 0 or not args.init_method.startswith("file://"):
        return None
    folder = os.path.dirname(args.init_method[len("file://"):])
    return folder if os.path.basename(folder).startswith("distlab-ranks-") else None


def join_process_group(args: argparse.Namespace, device: torch.device) -> None:
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        args.backend,
        init_method=args.init_method,
        rank=args.rank,
        world_size=args.world_size,
        timeout=timedelta(minutes=30),
        **({"device_id": device} if args.backend == "nccl" else {}),
    )


def install_sources(sources: dict[str, list[str]]) -> None:
    """Let tracebacks show the notebook cell's lines: cells are not files, so ship their text."""
    for filename, lines in sources.items():
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)


def is_comm_error(error: BaseException) -> bool:
    """A peer's collective broke because another rank went away: a symptom, not the root cause."""
    return isinstance(error, getattr(dist, "DistBackendError", ())) or any(
        hint in str(error) for hint in COMM_ERROR_HINTS
    )


def dump_stacks_on_request(run_dir: str, rank: int):
    """On SIGUSR1 (the launcher's, at a timeout) write every thread's Python stack to stacks/rank<r>.txt.
    faulthandler does it from C, so it works while the rank is blocked inside a send or a collective."""
    path = rank_file(run_dir, "stacks", rank)
    path.parent.mkdir(exist_ok=True)  # a run folder made by an older distlab has no stacks/
    stacks = open(path, "w")
    faulthandler.register(STACKS_SIGNAL, file=stacks, all_threads=True)
    return stacks


_loaded: dict[str, tuple[int, int]] = {}  # module -> (mtime_ns, size) of its file when this rank ran it


def reload_edited_modules(files: dict[str, tuple[int, int]]) -> None:
    """A warm rank runs the user's modules as they are now: cloudpickle ships their functions by name, so a
    module whose file changed since this rank last ran it is reloaded first."""
    for name, stamp in files.items():
        module = sys.modules.get(name)
        if module is not None and _loaded.get(name, stamp) != stamp:
            importlib.reload(module)
        _loaded[name] = stamp


class FreshState:
    """What one job may change in a warm rank's torch that the next job must not inherit: the default
    dtype and device, the thread count, grad mode, the random streams."""

    def __init__(self, threads: int):
        self.threads, self.rng = threads, (torch.get_rng_state(), random.getstate(), np.random.get_state())

    def restore(self) -> None:
        torch.set_default_dtype(torch.float32)
        torch.set_default_device(None)
        torch.set_num_threads(self.threads)
        torch.set_grad_enabled(True)
        torch.set_rng_state(self.rng[0])
        random.setstate(self.rng[1])
        np.random.set_state(self.rng[2])


class JobDevice(DeviceContext):
    """torch.set_default_device's mode, plus: a draw from a generator of another device (a CPU generator, as
    DistributedSampler's) is drawn there and moved here, where torch would reject it. The same seed then
    gives the same numbers on every device, on ctx.device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("device") is None and func in _device_constructors():
            generator = kwargs.get("generator")
            if generator is not None and generator.device.type != self.device.type:
                wants_grad = kwargs.pop("requires_grad", False)  # the moved copy is the leaf
                drawn = func(*args, **{**kwargs, "device": generator.device}).to(self.device)
                return drawn.requires_grad_() if wants_grad else drawn
            kwargs["device"] = self.device
        return func(*args, **kwargs)


def place_job(device: torch.device) -> torch.device:
    """The job's device becomes torch's default, so `torch.ones(n)` in a rank lands on ctx.device
    (FreshState's torch.set_default_device(None) undoes it). The CPU is torch's own default: nothing to set,
    and no per-call cost (the audit's cpu:0 too: the audit takes a tensor made without a device as made there)."""
    device = audit.job_device(device)
    if device.type != "cpu":
        torch.set_default_device(None)
        mode = JobDevice(device)
        mode.__enter__()
        torch._GLOBAL_DEVICE_CONTEXT.device_context = mode  # where set_default_device keeps its own
    return device


def on_device(value, device: torch.device):
    """The launch's arguments with their tensors moved to the job's device (they arrive unpickled on the CPU):
    in lists, tuples, dicts and dataclasses too, so a rank never mixes them with its own tensors."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(on_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: on_device(v, device) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: on_device(getattr(value, f.name), device) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **fields)
    return value


def run_job(args, device: torch.device, job: Job) -> Done | Failed:
    install_sources(job.sources)
    reload_edited_modules(job.modules)
    device = place_job(device)
    ctx = Context(args.rank, args.world_size, device, args.backend, job.run_dir, attempt=job.attempt)
    stacks, me = dump_stacks_on_request(job.run_dir, args.rank), os.getpid()
    try:
        fn, kwargs = cloudpickle.loads(job.payload)
        kwargs = on_device(kwargs, device) if device != torch.device("cpu") else kwargs
        dist.barrier()
        with audit.auditing(device) if audit.enabled() else nullcontext():
            result = fn(ctx, **kwargs)
        leave_if_forked(me)
        ctx.finish()
        return save(job.run_dir, args.rank, result)
    except BaseException as error:
        leave_if_forked(me)
        frames = error.__traceback__.tb_next  # start at the user's function, not at this one
        details = "".join(traceback.format_exception(type(error), error, frames))
        return Failed(args.rank, time.time(), details, is_comm_error(error))
    finally:
        faulthandler.unregister(STACKS_SIGNAL)
        stacks.close()
        ctx.close()
        for stream in (sys.stdout, sys.stderr):
            stream.write(f"{JOB_END}\n")
            stream.flush()


def leave_if_forked(rank_pid: int) -> None:
    """A child the user's function forked has returned from it: it must not report on the rank's pipe."""
    if os.getpid() != rank_pid:
        os._exit(0)


def save(run_dir: str, rank: int, result) -> Done | Failed:
    try:
        save_result(run_dir, rank, result)
    except Exception as error:
        return Failed(rank, time.time(), f"the return value of rank {rank} could not be pickled: "
                      f"{type(result).__name__} ({type(error).__name__}: {error}). Return tensors, numbers, "
                      "lists and dicts of them; create anything else on the launching side.", False)
    return Done(rank)


def main(argv=None) -> None:
    args = parse_args(argv)
    faulthandler.enable()  # a segfault still shows the Python stack on stderr
    commands = Connection(args.cmd_fd, writable=False)
    reports = Connection(args.report_fd, readable=False)
    jobs: queue.Queue = queue.Queue()
    threading.Thread(target=read_commands, args=(commands, jobs, scratch_folder(args)), daemon=True).start()
    device = torch.device(args.device)
    join_process_group(args, device)
    fresh = FreshState(args.threads)
    reports.send(Ready(args.rank, os.getpid(), str(device), args.threads))
    while isinstance(job := jobs.get(), Job):
        reports.send(run_job(args, device, job))
        fresh.restore()
    os._exit(0)  # Exit: skip interpreter teardown, the launcher is waiting


if __name__ == "__main__":
    main()
