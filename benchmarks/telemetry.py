"""What watching costs: DDP step time with `ctx.watch` + `ctx.log` every step, beside the same training without.

    python benchmarks/telemetry.py            # 2 and 4 ranks, a ~1 ms and a ~10 ms step (a few minutes)
    python benchmarks/telemetry.py --quick    # fewer steps

Each rank trains two identical DDP replicas of the same model, step by step in turn (AB BA AB ...):
one watched (`ctx.watch(model, drift_every=10)`, `ctx.log(step=.., loss=..)` after every step:
gradient norms, the counted DDP hook, drift every 10 steps, rows written in batches), one plain (no ctx
call at all; its own process group, so neither waits on the other's all-reduces). Turn-taking inside
one run means a burst of load on a shared machine hits both alike. The first WARMUP steps of each are
dropped; medians and means are over every step of every rank. Besides wall-clock, each step's CPU
seconds of the whole rank process (all its threads) are compared: unlike wall-clock, they hardly move
when other programs compete for the cores. Targets: overhead <= 5% at the ~1 ms step, <= 1% at ~10 ms.
It reports numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from launch_overhead import format_table, machine_description
from torch.nn.parallel import DistributedDataParallel as DDP

import distlab as dl

WARMUP = 20  # steps of each replica dropped
CONFIGS = {"~1 ms": ((64, 64, 10), 32), "~10 ms": ((64, 512, 512, 10), 128)}  # mlp sizes, batch per rank
TARGETS = {"~1 ms": 5.0, "~10 ms": 1.0}  # percent


def paired_step_times(ctx, sizes: tuple[int, ...], batch: int, steps: int, every: int = 1) -> dict[str, list[float]]:
    """Rank function: seconds of each step of the plain and the watched replica, taken in turn."""
    x, y, _, _ = dl.data.digits(ctx.rank, ctx.world_size)
    x, y = x.to(ctx.device), y.to(ctx.device)
    replicas = {}
    for name, group in (("plain", dist.new_group()), ("watched", None)):  # apart: no all-reduce waits on the other's
        torch.manual_seed(0)
        model = DDP(dl.models.mlp(*sizes).to(ctx.device), process_group=group)
        replicas[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01))
    ctx.watch(replicas["watched"][0], drift_every=10, every=every)
    picks = torch.Generator().manual_seed(ctx.rank)
    times: dict[str, list[float]] = {"plain": [], "watched": [], "plain cpu": [], "watched cpu": []}
    for step in range(steps):
        for name in ("plain", "watched") if step % 2 == 0 else ("watched", "plain"):
            model, optimizer = replicas[name]
            start, cpu = time.perf_counter(), time.process_time()
            pick = torch.randint(len(x), (batch,), generator=picks).to(ctx.device)
            loss = F.cross_entropy(model(x[pick]), y[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if name == "watched":
                ctx.log(step=step, loss=loss.item())
            else:
                loss.item()  # the same host sync the watched replica does for its row
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            times[f"{name} cpu"].append(time.process_time() - cpu)
    return {name: t[WARMUP:] for name, t in times.items()}


def measure(world_size: int, steps: int, every: int, scratch: str) -> list[list]:
    rows = []
    for label, (sizes, batch) in CONFIGS.items():
        print(f"{world_size} ranks, {label} step ...", file=sys.stderr, flush=True)
        with contextlib.redirect_stdout(io.StringIO()):
            run = dl.launch(paired_step_times, world_size, sizes=sizes, batch=batch, steps=steps, every=every,
                            runs_root=scratch, timeout=900)
        ms = {name: [t * 1000 for rank in run.results for t in rank[name]] for name in run.results[0]}
        median = {name: statistics.median(v) for name, v in ms.items()}
        mean = {name: statistics.fmean(v) for name, v in ms.items()}

        def overhead(of: dict, kind: str = "") -> float:
            return (of[f"watched{kind}"] / of[f"plain{kind}"] - 1) * 100

        verdict = "met" if overhead(median) <= TARGETS[label] else "NOT met"
        rows.append([world_size, label, f"{median['plain']:.3f}", f"{median['watched']:.3f}",
                     f"{overhead(median):+.1f}%", f"{overhead(mean):+.1f}%", f"{median['plain cpu']:.3f}",
                     f"{median['watched cpu']:.3f}", f"{overhead(median, ' cpu'):+.1f}%",
                     f"<= {TARGETS[label]:.0f}%: {verdict}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="150 steps of each replica instead of 400")
    parser.add_argument("--every", type=int, default=1, help="gradient norms every k steps (ctx.watch(every=k))")
    args = parser.parse_args()
    steps = 150 if args.quick else 400
    began = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="distlab-bench-") as scratch:
        for world_size in (2, 4):
            rows += measure(world_size, steps, args.every, scratch)
            dl.shutdown()
    print(machine_description())
    print(format_table(
        f"Telemetry overhead: median step ms (wall, and CPU of the rank's process), steps {WARMUP}..{steps} "
        "of each replica, all ranks "
        f"(gradient norms every {args.every} step(s), drift every 10)",
        ["ranks", "step", "plain", "watched", "overhead", "(of means)", "plain CPU", "watched CPU", "CPU overhead",
         "target (wall, median)"], rows))
    print(f"total {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
