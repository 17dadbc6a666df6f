"""python -m distlab run module:function --world-size 4 [--key value ...]

Outside a launcher it spawns the ranks with dl.launch. Under torchrun (RANK and WORLD_SIZE set, one
or many machines) this process *is* a rank: it joins torchrun's process group and runs the function.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from .context import Context
from .launch import launch, place
from .ranks import gloo_reason
from .runs import make_run_dir, new_run_dir, save_result, write_config
from .worker import place_job


def load_function(spec: str):
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"expected module:function, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    return getattr(importlib.import_module(module_name), attr)


def parse_kwargs(pairs: list[str]) -> dict:
    """--lr 0.1 --name adam  ->  {'lr': 0.1, 'name': 'adam'} (Python literals where they parse)."""
    if len(pairs) % 2 or not all(k.startswith("--") for k in pairs[::2]):
        raise SystemExit(f"function arguments must come as --key value pairs, got {pairs}")
    kwargs = {}
    for key, value in zip(pairs[::2], pairs[1::2]):
        try:
            kwargs[key[2:].replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key[2:].replace("-", "_")] = value
    return kwargs


def _store_of_this_attempt(rank: int, world_size: int, attempt: int) -> dist.Store:
    """torchrun's store, under a prefix per restart. Its agent keeps one store across restarts, so without
    the prefix a restarted rank can read the address its peer had in the previous attempt (a dead
    process) and fail to connect (seen with torch 2.13 and --max-restarts)."""
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_hosts_it, timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"distlab/attempt{attempt}", store)


def run_under_torchrun(fn, kwargs: dict, runs_root: str | None) -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    placement = place(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), needs_gloo=gloo_reason(fn))  # dl.launch's rule
    device, backend = torch.device(placement.devices[local_rank]), placement.backend
    if device.type == "cuda":
        torch.cuda.set_device(device)
        place_job(device)  # torch's default device, as in a dl.launch rank
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    dist.init_process_group(backend, store=_store_of_this_attempt(rank, world_size, attempt), rank=rank,
                            world_size=world_size, timeout=timedelta(minutes=30))
    # Each machine writes its own folder, all under the name rank 0 picked, so they line up.
    names = [str(new_run_dir(fn.__name__, runs_root)) if rank == 0 else None]
    dist.broadcast_object_list(names)
    run_dir = make_run_dir(names[0])
    if rank == 0:
        write_config(run_dir, name=fn.__name__, world_size=world_size, backend=backend, status="running",
                     launcher="torchrun", kwargs={k: repr(v) for k, v in kwargs.items()})
    ctx = Context(rank, world_size, device, backend, run_dir, local_rank=local_rank, attempt=attempt)
    dist.barrier()
    result = fn(ctx, **kwargs)
    ctx.finish()
    save_result(run_dir, rank, result)
    ctx.close()
    dist.barrier()
    if rank == 0:
        write_config(run_dir, status="ok")
        print(f"rank 0 result: {result!r}\nrun folder: {run_dir}")
    dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distlab")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run module:function on N ranks")
    run.add_argument("function", help="module:function, the function taking ctx first")
    run.add_argument("--world-size", type=int, default=2)
    run.add_argument("--backend", default="auto")
    run.add_argument("--timeout", type=float, default=None)
    run.add_argument("--runs-root", default=None)
    args, rest = run.parse_known_args(sys.argv[2:] if argv is None else argv[1:])
    fn, kwargs = load_function(args.function), parse_kwargs(rest)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        run_under_torchrun(fn, kwargs, args.runs_root)
        return
    place(args.world_size, args.backend, gloo_reason(fn))
    result = launch(fn, args.world_size, backend=args.backend, timeout=args.timeout,
                    runs_root=args.runs_root, **kwargs)
    for rank, value in enumerate(result.results):
        print(f"rank {rank} result: {value!r}")
    print(f"run folder: {result.dir}")


if __name__ == "__main__":
    main()
