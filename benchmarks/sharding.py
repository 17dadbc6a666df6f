"""Data parallelism against ZeRO-1/2/3 by hand and FSDP2 on the tiny GPT: step time, peak bytes per rank and bytes
sent per rank and step, side by side, on 2 and 4 ranks.

    python benchmarks/sharding.py                       # CPU: 2 and 4 ranks, the notebook's GPT
    python benchmarks/sharding.py --ranks 2 --d-model 256 --layers 8 --batch 16

Every path places its tensors on ctx.device, so with backend="auto" the same script runs on GPUs (NCCL, one GPU
per rank). Step time is the median over `--steps` steps after the first (which builds buffers and, for FSDP2, its
lazy state), the slowest rank's. Peak bytes: what the rank holds between steps (parameters, Adam's state, from the
tensors) plus the peak of one extra step above its start (the CPU profiler's allocation records; on a GPU
torch.cuda.max_memory_allocated). On CPU that peak is an upper bound where storage is resized (ZeRO-3, FSDP2 free a
layer by shrinking its storage): the profiler does not see those frees ("memory block of unknown size"), so they
count as still held. Bytes sent: every collective's buffer as it ran, counted as a ring sends it.
"""

from __future__ import annotations

import argparse
import os

import torch

import distlab as dl
from distlab import gpt
from distlab.parallel import zero

METHODS = ("ddp", "plain", "zero1", "zero2", "zero3", "fsdp2")
NAMES = {"ddp": "DDP", "plain": "all-reduce by hand", "zero1": "ZeRO-1 by hand", "zero2": "ZeRO-2 by hand",
         "zero3": "ZeRO-3 by hand", "fsdp2": "FSDP2 (fully_shard)"}


def row(results: list[dict], method: str, steps: int) -> dict:
    per_rank = [r[method] for r in results]
    median = max(sorted(r["seconds"][1:])[len(r["seconds"][1:]) // 2] for r in per_rank)
    peak = max(r["held"]["params"] + r["held"]["optimizer"] + r["step_peak"] for r in per_rank)
    sent = max(sum(c["sent"] for c in r["calls"]) / steps for r in per_rank)
    return {"step ms": 1000 * median, "peak MB": peak / 1e6, "sent MB/step": sent / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    cfg = gpt.GPTConfig(block_size=args.block, d_model=args.d_model, n_head=args.heads, n_layer=args.layers)
    tables = {}
    for n in args.ranks:
        run = dl.launch(zero.compare, world_size=n, backend=args.backend, timeout=900, steps=args.steps,
                        batch=args.batch, cfg=cfg, methods=METHODS, peak=True)
        tables[n] = {m: row(run.results, m, args.steps) for m in METHODS}
        placement = run.config["placement"]
    params = sum(p.numel() for p in gpt.gpt(cfg).parameters())
    print(f"\n{os.cpu_count()} CPU cores, torch {torch.__version__}, last placement: {placement}; GPT d_model="
          f"{args.d_model}, {args.layers} blocks, {params:,} parameters, batch {args.batch} × {args.block} per rank")
    print(f"{'':24s}" + "".join(f"{f'{n} ranks: step ms · peak MB · sent MB':>40s}" for n in tables))
    for m in METHODS:
        cells = "".join(f"{t[m]['step ms']:>16.1f}{t[m]['peak MB']:>12.2f}{t[m]['sent MB/step']:>12.3f}"
                        for t in tables.values())
        print(f"{NAMES[m]:24s}{cells}")
    for n, t in tables.items():
        print(f"{n} ranks: ZeRO-3 by hand / FSDP2 step time = {t['zero3']['step ms'] / t['fsdp2']['step ms']:.2f}")


if __name__ == "__main__":
    main()
