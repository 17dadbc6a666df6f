"""How much does distlab cost compared with plain PyTorch? Two measurements, printed as tables.

1. Start-up: seconds from the call until every rank is past its first `dist.barrier()`, for world
   sizes 2 and 4, median of 3 repeats, for `torchrun --standalone`, `torch.multiprocessing.spawn`,
   a cold `dl.launch(..., fresh=True)` and a warm `dl.launch` (ranks reused; also the time until it
   returns). Targets: cold dl.launch <= 1.2x torchrun; a warm launch returns in < 1 s.
2. Telemetry overhead: step time of the same small DDP training (mlp(64, 64, 10) on digits shards,
   SGD, batch 32) with `ctx.watch(model, drift_every=10)` + `ctx.log(step=.., loss=..)` every step,
   and without either. Runs alternate with/without (6 pairs of 300 steps), the first 20 steps of each
   run are dropped; medians are over every step of every rank and repeat. Target: <= 5%.

Run:  .venv/bin/python benchmarks/launch_overhead.py [--quick]   (--quick: 1 repeat, 1 pair of 100 steps)
It reports numbers and asserts nothing; progress goes to stderr, the tables to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import distlab as dl
from distlab.ranks import free_port

WORLD_SIZES = (2, 4)
WARMUP_STEPS = 20
SUBPROCESS_TIMEOUT = 180  # seconds; a start-up that hangs is killed, never left behind

TORCHRUN_SCRIPT = """\
import os, sys, time
import torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
past_barrier = time.time()
open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"]), "w").write(repr(past_barrier))
dist.destroy_process_group()
"""


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_timestamps(folder: Path) -> list[float]:
    return [float(path.read_text()) for path in folder.glob("rank*")]


# -- start-up -----------------------------------------------------------------------------------
def startup_torchrun(world_size: int, scratch: Path) -> float:
    script, out = scratch / "barrier.py", Path(tempfile.mkdtemp(dir=scratch))
    script.write_text(TORCHRUN_SCRIPT)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={world_size}", str(script), str(out)]
    start = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers share the session's group
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed:\n{output.decode(errors='replace')[-2000:]}")
    return max(read_timestamps(out)) - start


def spawned_rank(rank: int, world_size: int, port: int, out: str) -> None:
    """Runs in a process started by torch.multiprocessing.spawn (module level: spawn imports it)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    dist.barrier()
    past_barrier = time.time()
    Path(out, f"rank{rank}").write_text(repr(past_barrier))
    dist.destroy_process_group()


def startup_mp_spawn(world_size: int, scratch: Path) -> float:
    out = tempfile.mkdtemp(dir=scratch)
    start = time.time()
    ranks = mp.spawn(spawned_rank, args=(world_size, free_port(), out), nprocs=world_size, join=False)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            raise TimeoutError("torch.multiprocessing.spawn ranks did not finish")
    return max(read_timestamps(Path(out))) - start


def time_past_barrier(ctx) -> float:
    dist.barrier()  # dl.launch already barriered before calling us: this one is for parity
    return time.time()


def startup_distlab(world_size: int, scratch: Path) -> tuple[float, float, float]:
    """(cold past-barrier, warm past-barrier, warm until launch returns), in seconds."""
    dl.shutdown()  # stopping an old pool is not part of starting a new one
    start = time.time()
    cold = max(quiet_launch(time_past_barrier, world_size, scratch, fresh=True).results) - start
    start = time.time()
    warm_run = quiet_launch(time_past_barrier, world_size, scratch)
    warm_return = time.time() - start
    warm = max(warm_run.results) - start
    dl.shutdown()
    return cold, warm, warm_return


def quiet_launch(fn, world_size: int, scratch: Path, **kwargs) -> dl.Run:
    """dl.launch with its banner lines swallowed and its run folders in the scratch directory."""
    with contextlib.redirect_stdout(io.StringIO()):
        return dl.launch(fn, world_size, runs_root=str(scratch / "runs"), **kwargs)


def measure_startup(repeats: int, scratch: Path) -> list[list]:
    rows = []
    for world_size in WORLD_SIZES:
        samples: dict[str, list[float]] = {k: [] for k in ("torchrun", "spawn", "cold", "warm", "return")}
        for repeat in range(repeats):
            progress(f"start-up: world size {world_size}, repeat {repeat + 1}/{repeats}")
            samples["torchrun"].append(startup_torchrun(world_size, scratch))
            samples["spawn"].append(startup_mp_spawn(world_size, scratch))
            for key, value in zip(("cold", "warm", "return"), startup_distlab(world_size, scratch)):
                samples[key].append(value)
        med = {key: statistics.median(values) for key, values in samples.items()}
        rows.append([world_size, *(f"{med[k]:.3f}" for k in samples), f"{med['cold'] / med['torchrun']:.2f}x"])
    return rows


# -- telemetry overhead ---------------------------------------------------------------------------
def train_step_times(ctx, steps: int, telemetry: bool) -> list[float]:
    """The notebook's DDP training; returns each step's seconds (perf_counter), telemetry included."""
    torch.manual_seed(0)
    x, y, _, _ = dl.data.digits(ctx.rank, ctx.world_size)
    model = DDP(dl.models.mlp(64, 64, 10))
    if telemetry:
        ctx.watch(model, drift_every=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = torch.Generator().manual_seed(ctx.rank)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        pick = torch.randint(len(x), (32,), generator=batches)
        loss = F.cross_entropy(model(x[pick]), y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if telemetry:
            ctx.log(step=step, loss=loss.item())
        times.append(time.perf_counter() - start)
    return times


def measure_telemetry_overhead(pairs: int, steps: int, scratch: Path) -> list[list]:
    rows = []
    for world_size in WORLD_SIZES:
        quiet_launch(train_step_times, world_size, scratch, steps=WARMUP_STEPS, telemetry=True)  # start ranks
        step_ms: dict[bool, list[float]] = {False: [], True: []}
        for pair in range(pairs):
            progress(f"telemetry: world size {world_size}, pair {pair + 1}/{pairs}")
            order = (False, True) if pair % 2 == 0 else (True, False)  # ABBA: slow drift cancels out
            for telemetry in order:
                run = quiet_launch(train_step_times, world_size, scratch, steps=steps, telemetry=telemetry)
                step_ms[telemetry] += [t * 1000 for rank in run.results for t in rank[WARMUP_STEPS:]]
        dl.shutdown()
        median = {k: statistics.median(v) for k, v in step_ms.items()}
        mean = {k: statistics.fmean(v) for k, v in step_ms.items()}
        rows.append([world_size, f"{median[False]:.3f}", f"{median[True]:.3f}",
                     f"{(median[True] / median[False] - 1) * 100:+.1f}%",
                     f"{median[True] - median[False]:+.3f}", f"{mean[False]:.3f}",
                     f"{mean[True]:.3f}", f"{(mean[True] / mean[False] - 1) * 100:+.1f}%"])
    return rows


# -- report ---------------------------------------------------------------------------------------
def format_table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([title, *lines[:1], "  ".join("-" * w for w in widths), *lines[1:]])


def machine_description() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return (f"machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {model}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def leftover_processes() -> str:
    """Our descendants still alive, except multiprocessing's resource tracker (mp.spawn starts it; it
    lives as long as this process and ends with it)."""
    try:
        import psutil
    except ImportError:
        return "unknown (no psutil)"
    left = [p for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())]
    return str(len(left)) + "".join(f"\n  {p.pid}: {' '.join(p.cmdline())[:100]}" for p in left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat and 1 pair of 100 steps")
    args = parser.parse_args()
    repeats, pairs, steps = (1, 1, 100) if args.quick else (3, 6, 300)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="distlab-bench-") as scratch_name:
        scratch = Path(scratch_name)
        subprocess.run([sys.executable, "-c", "import torch.distributed"], check=True)  # warm the file cache
        startup = measure_startup(repeats, scratch)
        overhead = measure_telemetry_overhead(pairs, steps, scratch)
    print(machine_description())
    print()
    print(format_table(
        f"Start-up: seconds until every rank is past its first barrier (median of {repeats})",
        ["world", "torchrun", "mp.spawn", "dl cold", "dl warm", "dl warm returns", "cold/torchrun"], startup))
    print("targets: cold/torchrun <= 1.20x; warm launch returns in < 1 s")
    print()
    print(format_table(
        f"Telemetry overhead: step ms, steps {WARMUP_STEPS}+ of {pairs} with/without pair(s) x {steps} steps, "
        "all ranks",
        ["world", "without (median)", "with (median)", "overhead", "added ms", "without (mean)", "with (mean)",
         "overhead"],
        overhead))
    print("target: overhead <= 5%")
    print()
    print(f"total {time.monotonic() - began:.0f} s; processes left behind: {leftover_processes()}")


if __name__ == "__main__":
    main()
