"""Distributed inference: serving the tiny GPT with its layers split across ranks, and one block split by
tensor parallelism.

A request is a prompt of `block_size` characters; its answer is the model's next character. Stage 0
takes the queued requests `micro_batch` at a time and sends each micro-batch's activations on; the
last stage answers. While stage 1 works on micro-batch j, stage 0 already computes j + 1 (pipelining,
as in GPipe's forward half), but no further: a stage waits until its previous send was received.
Bigger micro-batches use each stage better (throughput) but every request in one waits for the whole
micro-batch (latency): the trade-off this module measures. Generating many tokens per request (KV cache,
continuous batching, a paged cache, tensor-parallel decoding) is `serving.py`.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .. import gpt
from ..ranks import world_sizes
from .pipeline import layer_count, stage_module
from .tensor import GroupAllReduce, block_input, tp_block, whole_heads


def requests(n: int, cfg: gpt.GPTConfig | None = None, seed: int = 0) -> torch.Tensor:
    """n prompts: windows of the corpus, (n, block_size) character ids."""
    cfg = cfg or gpt.GPTConfig()
    return next(gpt.batches(n, cfg.block_size, seed))[0]


def _check(micro_batch: int, n_requests: int) -> None:
    if not 1 <= micro_batch <= n_requests:
        raise ValueError(f"micro_batch={micro_batch} must be between 1 and n_requests={n_requests}")


@world_sizes(lambda n, stages=None, cfg=None, **_: (stages or n) <= min(n, layer_count(cfg)),
             f"the first `stages` ranks serve (default: all of them), each stage at least one of the GPT's "
             f"{layer_count(None)} layers")
@torch.no_grad()
def serve_pipelined(ctx, n_requests: int = 64, micro_batch: int = 8, stages: int | None = None,
                    cfg: gpt.GPTConfig | None = None, seed: int = 0) -> dict:
    """Serve n_requests through `stages` ranks (default: all; 1 is the single-process baseline, the other
    ranks idle). Returns this stage's timeline; the last stage also the last-position logits."""
    _check(micro_batch, n_requests)
    cfg = cfg or gpt.GPTConfig()
    stage, p = ctx.rank, stages or ctx.world_size
    if not 1 <= p <= ctx.world_size:
        raise ValueError(f"stages={stages} must be between 1 and world_size={ctx.world_size}")
    if stage >= p:
        dist.barrier()
        return dict(events=[], logits=None)
    module = stage_module(gpt.gpt(cfg, seed), stage, p).to(ctx.device).eval()
    prompts = requests(n_requests, cfg, seed).to(ctx.device)
    # warm-up
    module(torch.randn(micro_batch, cfg.block_size, cfg.d_model, device=ctx.device) if stage else prompts[:micro_batch])
    events, logits, in_flight = [], [], None
    dist.barrier()
    t0 = time.perf_counter()
    for j, chunk in enumerate(prompts.split(micro_batch)):
        if stage == 0:
            x = chunk
        else:
            x = ctx.comm.recv(torch.empty(len(chunk), cfg.block_size, cfg.d_model, device=ctx.device), stage - 1,
                              tag="pp")
        start = time.perf_counter()
        y = module(x)
        events.append(dict(stage=stage, kind="F", micro=j, start=start - t0, end=time.perf_counter() - t0))
        if stage < p - 1:
            if in_flight:
                in_flight.wait()  # back-pressure: at most one micro-batch waits for the next stage
            in_flight = ctx.comm.isend(y, stage + 1, tag="pp")
        else:
            logits.append(y[:, -1].cpu())
    if in_flight:
        in_flight.wait()
    return dict(events=events, logits=torch.cat(logits) if stage == p - 1 else None)


def latency_throughput(events: list[dict], n_requests: int) -> dict:
    """Mean latency of a request (its micro-batch entering stage 0 until its answer leaves the last
    stage) and throughput (requests answered per second of the whole stream)."""
    last = max(e["stage"] for e in events)
    entry = {e["micro"]: e["start"] for e in events if e["stage"] == 0}
    exit_ = {e["micro"]: e["end"] for e in events if e["stage"] == last}
    latency = sum(exit_[j] - entry[j] for j in entry) / len(entry)
    return dict(latency_ms=1000 * latency, throughput=n_requests / (max(exit_.values()) - min(entry.values())))


@whole_heads
@torch.no_grad()
def tp_block_inference(ctx, batch: int = 4, seed: int = 0) -> dict:
    """One transformer block's forward, Megatron-sharded across all ranks (heads and MLP units split)."""
    reduce = GroupAllReduce(ctx)
    block = gpt.gpt(gpt.GPTConfig(n_layer=1), seed)[1]
    sharded = tp_block(block, ctx.rank, ctx.world_size, reduce).to(ctx.device).eval()
    start = time.perf_counter()
    out = sharded(block_input(batch).to(ctx.device))
    seconds = time.perf_counter() - start
    return dict(out=out.cpu(), all_reduces=reduce.count, seconds=seconds,
                weight_share=sum(q.numel() for q in sharded.parameters()) / sum(q.numel() for q in block.parameters()))
