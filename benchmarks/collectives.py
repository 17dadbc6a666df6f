"""Bus bandwidth of the hand-written all-reduces beside gloo's, then of the transports beside their limit.

    python benchmarks/collectives.py            # 4 KB ... 64 MB (a few minutes)
    python benchmarks/collectives.py --quick    # 4 KB ... 16 MB, fewer calls

1. Algorithms (distlab/communication/collectives.py) at 2 and 4 ranks, all over gloo's TCP.
   Target: ring >= 0.8x gloo at 16 MB and above.
2. Transports on 2 ranks of one machine: gloo (loopback TCP), the ring over gloo, the shared-memory
   all-reduce (distlab/communication/shared_memory.py), MPICH's Allreduce under mpiexec
   (distlab/communication/mpi.py), and a single-thread memcpy of the same bytes: the limit.
   Targets at >= 16 MB: shared memory >= 0.5x memcpy, >= 3x gloo, >= MPI.

Bus bandwidth = algorithm bandwidth (bytes / seconds) x 2(N-1)/N, the factor that makes an all-reduce
on N ranks comparable with a point-to-point link (the convention of NVIDIA's nccl-tests); memcpy's is
bytes / seconds. Seconds: the slowest rank's median over the calls, the contenders taking turns call by
call (MPI runs apart, in its own processes).
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

import distlab as dl
from distlab.communication import mpi
from distlab.communication.collectives import time_all_reduces
from distlab.communication.shared_memory import TRANSPORTS, time_transports

ALGORITHMS = ("naive", "ring", "recursive_doubling", "gloo")


def bus_bandwidth(row: dict) -> float:
    n = row["world_size"]
    factor = 1 if row["algorithm"] == "memcpy" else 2 * (n - 1) / n
    return row["bytes"] / row["seconds"] * factor / 1e9


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


# -- transports on 2 ranks --------------------------------------------------------------------------------
CONTENDERS = ("gloo", "ring", "shared_memory", "mpi", "memcpy")


def measure_transports(sizes: list[int], repeats: int) -> dict[tuple[int, str], float]:
    """(bytes, contender) -> bus bandwidth in GB/s, on 2 ranks."""
    run = dl.launch(time_transports, world_size=2, sizes=sizes, transports=TRANSPORTS, repeats=repeats,
                    timeout=1800, name="bench-transports")
    rows = run.results[0] + mpi.run("time_allreduce", world_size=2, timeout=1800, sizes=sizes,
                                    repeats=repeats)[0]["rows"]
    return {(r["bytes"], r["algorithm"]): bus_bandwidth(r) for r in rows}


def transport_table(bandwidth: dict[tuple[int, str], float]) -> str:
    lines = ["| size | " + " | ".join(f"{c} GB/s" for c in CONTENDERS) + " | shm / memcpy | shm / gloo | shm / mpi |",
             "|---" * (len(CONTENDERS) + 4) + "|"]
    for size in sorted({size for size, _ in bandwidth}):
        cells = [bandwidth[(size, c)] for c in CONTENDERS]
        shm = bandwidth[(size, "shared_memory")]
        ratios = [shm / bandwidth[(size, c)] for c in ("memcpy", "gloo", "mpi")]
        lines.append(f"| {human(size)} | " + " | ".join(f"{c:.3f}" for c in cells) + " | "
                     + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    return "\n".join(lines)


def transport_verdict(bandwidth: dict[tuple[int, str], float]) -> str:
    large = sorted(size for size, c in bandwidth if c == "shared_memory" and size >= 16 << 20)
    if not large:
        return "no size >= 16 MB measured"
    verdicts = []
    for name, against, target in (("memcpy", "memcpy", 0.5), ("gloo", "gloo", 3.0), ("MPI", "mpi", 1.0)):
        worst = min(bandwidth[(s, "shared_memory")] / bandwidth[(s, against)] for s in large)
        verdicts.append(f"shm >= {target:g}x {name}: {'met' if worst >= target else 'NOT met'} (lowest {worst:.2f}x)")
    return "targets at >= 16 MB, 2 ranks: " + "; ".join(verdicts)


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
    print()
    large = [s for s in sizes if s >= 1 << 20]
    bandwidth = measure_transports(large, repeats)
    dl.shutdown()
    print(transport_table(bandwidth))
    print(transport_verdict(bandwidth))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
