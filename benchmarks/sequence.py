"""Sequence-parallel attention step time and bytes: one process vs ring attention (contiguous, zig-zag) vs
DeepSpeed-Ulysses, on 2 and 4 ranks, printed side by side.

    python benchmarks/sequence.py                     # CPU: the tiny GPT's attention, 1,024 positions
    python benchmarks/sequence.py --seq 4096 --ranks 2 4 8

A step is one forward and backward of the tiny GPT's attention layer (loss = sum(out²)). Its time is the
slowest rank's fastest of `--repeats` steps (each started after a barrier); bytes are what each rank
sent, beside the formula in distlab/parallel/context_parallel.py. Tensors go on ctx.device, so the
same script runs on GPUs with backend="auto". On a CPU the ring can beat the one process by more than N:
it skips the masked half of the scores and its blocks fit in cache, where gpt.Attention materialises
the whole t x t matrix.
"""

from __future__ import annotations

import argparse
import time

import torch

import distlab as dl
from distlab.parallel import context_parallel as cp

SETUPS = (("ring", "contiguous"), ("ring", "zigzag"), ("ulysses", "contiguous"))


def single_step(ctx, batch: int, seq_len: int, repeats: int) -> float:
    """The whole sequence in one process: the fastest of `repeats` forward + backward steps, in seconds."""
    attn, x = cp.attention_setup(batch, seq_len)
    attn, x = attn.to(ctx.device), x.to(ctx.device).requires_grad_()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        attn(x).pow(2).sum().backward()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    one = dl.launch(single_step, world_size=1, backend=args.backend, quiet=True, batch=args.batch,
                    seq_len=args.seq, repeats=args.repeats).results[0]
    print(f"attention of the tiny GPT, batch {args.batch} x {args.seq} positions, forward + backward")
    print(f"{'setup':28} {'step (ms)':>10} {'vs one':>7} {'sent/rank fwd+bwd (KiB)':>24} {'formula (KiB)':>14}")
    print(f"{'one process':28} {1000 * one:10.1f} {1.0:7.2f} {0:24.0f} {0:14.0f}")
    for n in args.ranks:
        for method, layout in SETUPS:
            run = dl.launch(cp.attention_step, world_size=n, backend=args.backend, quiet=True, method=method,
                            layout=layout, batch=args.batch, seq_len=args.seq, repeats=args.repeats)
            step = max(r["step_seconds"] for r in run.results)
            sent = max(sum(r["sent"].values()) for r in run.results)
            formula = sum(cp.predicted_bytes(method, n, run.results[0]["local_bytes"]).values())
            print(f"{f'{method}, {layout}, N = {n}':28} {1000 * step:10.1f} {one / step:7.2f} {sent / 1024:24.0f} "
                  f"{formula / 1024:14.0f}")
    dl.shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
