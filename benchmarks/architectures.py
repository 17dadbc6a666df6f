"""Choosing an architecture: one task (digits MLP 64-32-10, 5 epochs' worth of examples, batch 32 per
rank, lr 0.5) on 4 CPU ranks trained by all-reduce, parameter server (sync, async), gossip (ring, full)
and FedAvg; then the parameter server with a straggler.

    python benchmarks/architectures.py           # 3 repeats, median wall time (about a minute)
    python benchmarks/architectures.py --quick   # one repeat

Bytes, samples and updates are counts (the same every repeat but for async); wall time is the median
launch time over the repeats, ranks warm; accuracy the median final test accuracy.
"""

from __future__ import annotations

import argparse
import os
import platform

import pandas as pd
import torch

import distlab as dl
from distlab.architectures import compare

COLUMNS = ["wall_s", "samples", "updates", "syncs", "bytes_total", "bytes_busiest", "accuracy", "drift", "staleness"]


def median_table(tables: list[pd.DataFrame]) -> pd.DataFrame:
    numbers = pd.concat([t[COLUMNS] for t in tables])
    return numbers.groupby(level=0, sort=False).median()


def markdown(table: pd.DataFrame) -> str:
    lines = ["| architecture | wall s | samples | updates | rounds/worker | MB sent (all) | MB busiest rank "
             "| accuracy | drift | staleness |", "|---" * 10 + "|"]
    for name, r in table.iterrows():
        cells = [f"{r.wall_s:.2f}", f"{r.samples:.0f}", f"{r.updates:.0f}", f"{r.syncs:.0f}",
                 f"{r.bytes_total / 1e6:.3f}", f"{r.bytes_busiest / 1e6:.3f}", f"{r.accuracy:.3f}",
                 "—" if pd.isna(r.drift) else f"{r.drift:.4f}", "—" if pd.isna(r.staleness) else f"{r.staleness:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repeat instead of three")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--delay", type=float, default=0.02, help="the straggler's sleep per step (s)")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    task = compare.Task(epochs=args.epochs)
    plan = compare.plan(task)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}; {task.world_size} ranks (gloo, CPU); {plan['samples']} examples "
          f"per architecture; {repeats} repeat(s)")
    try:
        tables = [compare.compare(task) for _ in range(repeats)]
        slow = [compare.stragglers(task, delay=args.delay) for _ in range(repeats)]
    finally:
        dl.shutdown()
    print("\n" + markdown(median_table(tables)))
    print(f"\nParameter server with rank {task.world_size - 1} sleeping {args.delay} s every step:\n")
    print(markdown(median_table(slow)))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
