"""What watching costs: DDP step time with `ctx.watch` + `ctx.log` every step, beside the same training without.

    python benchmarks/telemetry.py                   # 2 and 4 ranks, a ~1 ms and a ~10 ms step (about a minute)
    python benchmarks/telemetry.py --quick           # fewer steps
    python benchmarks/telemetry.py --drift-every 10  # drift every 10 steps instead of ctx.watch's default

Each rank trains three identical DDP replicas of the same model, step by step in turn (ABC BCA CAB ...),
each on its own process group so that none waits on another's all-reduces: "plain" (no ctx call at
all), "plain again" (the same, so that its difference to "plain" shows what this measurement can
resolve on this machine: the noise floor) and "watched" (`ctx.watch(model)`, `ctx.log(step=.., loss=..)`
after every step: gradient norms every step, the DDP traffic counted, drift at ctx.watch's default
interval, rows written in batches). Turn-taking inside one run means a burst of load on a shared
machine hits all three alike, and the overhead is the median, over every round of every rank, of the
watched step minus the plain step of the same round, over the median plain step. The first WARMUP
steps of each are dropped. Besides wall-clock, each step's CPU seconds of the whole rank process (all
its threads) are compared the same way. Targets: overhead <= 5% at the ~1 ms step, <= 1% at ~10 ms.
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


REPLICAS = ("plain", "plain again", "watched")


def step_times(ctx, sizes: tuple[int, ...], batch: int, steps: int, watch: dict) -> dict[str, list[float]]:
    """Rank function: wall and CPU seconds of each step of the three replicas, taken in turn."""
    x, y, _, _ = dl.data.digits(ctx.rank, ctx.world_size)
    x, y = x.to(ctx.device), y.to(ctx.device)
    replicas = {}
    for name in REPLICAS:
        torch.manual_seed(0)
        model = DDP(dl.models.mlp(*sizes).to(ctx.device), process_group=dist.new_group())
        replicas[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01))
    ctx.watch(replicas["watched"][0], **watch)
    picks = torch.Generator().manual_seed(ctx.rank)
    times: dict[str, list[float]] = {f"{name}{kind}": [] for name in REPLICAS for kind in ("", " cpu")}
    for step in range(steps):
        for turn in range(len(REPLICAS)):
            name = REPLICAS[(step + turn) % len(REPLICAS)]
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


def overhead(results: list[dict], name: str, kind: str = "") -> float:
    """Percent: the median over rounds of this replica's step minus the plain one's in the same round (they
    ran back to back, so slow changes of the machine's load cancel), over the plain median."""
    plain = statistics.median(t for rank in results for t in rank[f"plain{kind}"])
    diffs = [a - b for rank in results for a, b in zip(rank[f"{name}{kind}"], rank[f"plain{kind}"])]
    return statistics.median(diffs) / plain * 100


def measure(world_size: int, steps: int, watch: dict, scratch: str) -> list[list]:
    rows = []
    for label, (sizes, batch) in CONFIGS.items():
        print(f"{world_size} ranks, {label} step ...", file=sys.stderr, flush=True)
        with contextlib.redirect_stdout(io.StringIO()):
            run = dl.launch(step_times, world_size, sizes=sizes, batch=batch, steps=steps, watch=watch,
                            runs_root=scratch, timeout=900)
        plain = statistics.median(t for rank in run.results for t in rank["plain"]) * 1000
        watched = overhead(run.results, "watched")
        verdict = "met" if watched <= TARGETS[label] else "NOT met"
        others = [overhead(run.results, "plain again"), overhead(run.results, "watched", " cpu"),
                  overhead(run.results, "plain again", " cpu")]
        rows.append([world_size, label, f"{plain:.3f}", f"{plain * (1 + watched / 100):.3f}", f"{watched:+.1f}%",
                     *(f"{o:+.1f}%" for o in others), f"<= {TARGETS[label]:.0f}%: {verdict}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="150 steps of each replica instead of 400")
    parser.add_argument("--every", type=int, help="gradient norms every k steps (ctx.watch(every=k))")
    parser.add_argument("--drift-every", type=int, help="drift every k steps (ctx.watch(drift_every=k))")
    args = parser.parse_args()
    steps = 150 if args.quick else 400
    watch = {key: value for key, value in (("every", args.every), ("drift_every", args.drift_every))
             if value is not None}
    began = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="distlab-bench-") as scratch:
        for world_size in (2, 4):
            rows += measure(world_size, steps, watch, scratch)
            dl.shutdown()
    print(machine_description())
    print(format_table(
        f"Telemetry overhead: median step ms and the median paired difference, steps {WARMUP}..{steps} of each "
        "replica, all ranks; "
        f"ctx.watch(model{''.join(f', {k}={v}' for k, v in watch.items())}). 'plain again' is the same "
        "plain training measured again: the noise floor",
        ["ranks", "step", "plain", "watched", "overhead", "plain again", "CPU overhead", "CPU plain again",
         "target (wall, median)"], rows))
    print(f"total {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
