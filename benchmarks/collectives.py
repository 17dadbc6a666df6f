"""Bus bandwidth of the hand-written all-reduces (distlab/communication/collectives.py) beside gloo's dist.all_reduce.

    python benchmarks/collectives.py            # world sizes 2 and 4, 4 KB ... 64 MB (about a minute)
    python benchmarks/collectives.py --quick    # 4 KB ... 16 MB, fewer calls (about 30 s)

Bus bandwidth = algorithm bandwidth (bytes / seconds) × 2(N-1)/N, the factor that makes an all-reduce
on N ranks comparable with a point-to-point link (the convention of NVIDIA's nccl-tests). Seconds: the
slowest rank's median over the calls, the algorithms taking turns call by call.
Target: ring ≥ 0.8× gloo at 16 MB and above.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

import distlab as dl
from distlab.communication.collectives import time_all_reduces

ALGORITHMS = ("naive", "ring", "recursive_doubling", "gloo")


def bus_bandwidth(row: dict) -> float:
    n = row["world_size"]
    return row["bytes"] / row["seconds"] * 2 * (n - 1) / n / 1e9


def measure(world_size: int, sizes: list[int], repeats: int) -> list[dict]:
    small = [s for s in sizes if s < 1 << 20]  # cheap: more calls for a steadier median
    large = [s for s in sizes if s >= 1 << 20]
    rows = []
    for part, calls in ((small, 4 * repeats), (large, repeats)):
        if part:
            run = dl.launch(time_all_reduces, world_size=world_size, sizes=part, algorithms=ALGORITHMS,
                            repeats=calls, timeout=1800, name=f"bench-allreduce-{world_size}")
            rows += run.results[0]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| ranks | size | " + " | ".join(f"{a} GB/s" for a in ALGORITHMS) + " | ring / gloo |",
             "|---" * (len(ALGORITHMS) + 3) + "|"]
    keyed = {(r["world_size"], r["bytes"], r["algorithm"]): bus_bandwidth(r) for r in rows}
    for n, size in sorted({(r["world_size"], r["bytes"]) for r in rows}):
        cells = [keyed[(n, size, a)] for a in ALGORITHMS]
        ratio = keyed[(n, size, "ring")] / keyed[(n, size, "gloo")]
        lines.append(f"| {n} | {human(size)} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {ratio:.2f}× |")
    return "\n".join(lines)


def human(size: int) -> str:
    return f"{size >> 20} MB" if size >= 1 << 20 else f"{size >> 10} KB"


def verdict(rows: list[dict]) -> str:
    keyed = {(r["world_size"], r["bytes"], r["algorithm"]): bus_bandwidth(r) for r in rows}
    ratios = {(n, s): keyed[(n, s, "ring")] / keyed[(n, s, "gloo")]
              for n, s, a in keyed if a == "ring" and s >= 16 << 20}
    if not ratios:
        return "no size >= 16 MB measured"
    worst = min(ratios, key=ratios.get)
    met = "met" if ratios[worst] >= 0.8 else "NOT met"
    return (f"target ring >= 0.8x gloo at >= 16 MB: {met} "
            f"(lowest {ratios[worst]:.2f}x at {worst[0]} ranks, {human(worst[1])})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 KB .. 16 MB, fewer calls")
    args = parser.parse_args()
    top, repeats = (16 << 20, 3) if args.quick else (64 << 20, 7)
    sizes = [4096 << (2 * k) for k in range(8) if 4096 << (2 * k) <= top]  # 4 KB, 16 KB, ... x4
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}")
    rows = []
    for world_size in (2, 4):
        rows += measure(world_size, sizes, repeats)
        dl.shutdown()
    print(table(rows))
    print(verdict(rows))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
