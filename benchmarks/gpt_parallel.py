"""Tokens per second training the tiny GPT: one process vs pipeline (GPipe, 1F1B) vs tensor parallel.

    python benchmarks/gpt_parallel.py                 # CPU: 2 ranks, the notebook's GPT
    python benchmarks/gpt_parallel.py --ranks 4 --d-model 256 --layers 8 --batch 64

Every path places its tensors on ctx.device, so with backend="auto" the same script runs on GPUs
(NCCL, one GPU per rank) unchanged. Throughput is taken from the ranks' own step timestamps
(ctx.log rows), after `--warmup` steps, so start-up and launch overhead are excluded. The single
process runs alone with every core's threads, and again with one thread (on a busy machine, OpenMP
threads that wait for each other can make the first much slower than the second).
"""

from __future__ import annotations

import argparse
import os

import torch

import distlab as dl
from distlab import gpt
from distlab.parallel import pipeline as pp
from distlab.parallel import tensor as tp


def single_train(ctx, steps: int, batch_size: int, cfg: gpt.GPTConfig) -> None:
    """The whole model in one process (launched alone, so it gets every core's threads, or one GPU)."""
    model = gpt.gpt(cfg).to(ctx.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = gpt.batches(batch_size, cfg.block_size)
    for step in range(steps):
        x, y = (t.to(ctx.device) for t in next(data))
        optimizer.zero_grad()
        loss = gpt.lm_loss(model(x), y)
        loss.backward()
        optimizer.step()
        ctx.log(step=step, loss=loss.item())


def tokens_per_second(run: dl.Run, warmup: int, tokens_per_step: int) -> float:
    rows = run.metrics.dropna(subset=["step"])
    rows = rows[rows["rank"] == rows["rank"].max()]  # the rank that logs (last stage / any shard)
    timed = rows[rows["step"] >= warmup - 1]
    return (len(timed) - 1) * tokens_per_step / (timed["t"].iloc[-1] - timed["t"].iloc[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    cfg = gpt.GPTConfig(block_size=args.block, d_model=args.d_model, n_head=args.heads, n_layer=args.layers)
    single = dict(steps=args.steps, batch_size=args.batch, cfg=cfg)
    setups = {
        "single process": (single_train, single),
        "single process, 1 thread": (single_train, dict(single, threads=1)),
        f"pipeline GPipe, p={args.ranks}, m={args.micro_batches}": (pp.pipeline_train, dict(
            schedule="gpipe", micro_batches=args.micro_batches, batch_size=args.batch, steps=args.steps, lr=0.1,
            cfg=cfg)),
        f"pipeline 1F1B, p={args.ranks}, m={args.micro_batches}": (pp.pipeline_train, dict(
            schedule="1f1b", micro_batches=args.micro_batches, batch_size=args.batch, steps=args.steps, lr=0.1,
            cfg=cfg)),
        f"tensor parallel, t={args.ranks}": (tp.data_tensor, dict(
            dp=1, tp=args.ranks, batch_size=args.batch, steps=args.steps, lr=0.1, cfg=cfg)),
    }
    results = {}
    for name, (fn, kwargs) in setups.items():
        ranks = 1 if fn is single_train else args.ranks
        run = dl.launch(fn, world_size=ranks, backend=args.backend, timeout=600, **kwargs)
        results[name] = tokens_per_second(run, args.warmup, args.batch * args.block)
        placement = run.config["placement"]
    print(f"\n{os.cpu_count()} CPU cores, torch {torch.__version__}, last placement: {placement}; "
          f"GPT d_model={cfg.d_model} layers={cfg.n_layer} heads={cfg.n_head} T={cfg.block_size}, "
          f"batch {args.batch}, {args.steps} steps ({args.warmup} warm-up)")
    print(f"{'setup':34} {'tokens/s':>10} {'vs single':>10}")
    base = results["single process"]
    for name, value in results.items():
        print(f"{name:34} {value:10.0f} {value / base:9.2f}x")
    dl.shutdown()


if __name__ == "__main__":
    main()
