"""Serving the tiny GPT the way an LLM server does: a KV cache, prefill and decode, continuous batching of a
request stream, a paged cache, and tensor-parallel decoding.

Generation is greedy: each new character is the argmax of the last position's logits.
- Without a cache every new character runs the whole sequence through the model again: the cost of a
  token grows with the sequence. With a **KV cache** (each layer's keys and values of the earlier
  positions, kept) a step runs one position and attends to the cached ones. **Prefill** is the first
  forward, over the whole prompt (it fills the cache and yields the first token); **decode** is every
  step after it.
- **Continuous batching** (Orca, Yu et al., OSDI 2022): the batch is formed again at every decode step;
  finished requests leave, arrived ones join after their prefill, so nobody waits for the longest request
  of a fixed batch. Each request holds a *slot* of the cache while it runs.
- `PagedKVCache` keeps keys and values in fixed-size blocks of one shared pool, found through each
  slot's block table (vLLM's PagedAttention, Kwon et al., SOSP 2023): memory is taken block by block as a
  sequence grows instead of reserving the longest possible sequence per slot.
- Tensor-parallel decoding shards every block Megatron-style (`tensor.tp_gpt`): each rank holds
  n_head / t heads and their part of the cache, two all-reduces per block per step; rank 0 schedules and
  broadcasts its admissions so that every rank forms the same batch.

The cached forward reuses the model's own submodules (`gpt.Attention`'s q, k, v, proj; the blocks' norms
and MLPs), so a sharded model decodes through the same code.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .. import gpt
from . import tensor as tp

SERVING_CFG = gpt.GPTConfig(block_size=128)  # the notebook's GPT with room for 128 positions per request
MODES = ("no cache", "kv cache", "batching")


def serving_model(seed: int = 0, cfg: gpt.GPTConfig | None = None) -> nn.Sequential:
    """The tiny GPT (untrained: serving cares about speed and equality, not what it says), in eval mode."""
    return gpt.gpt(cfg or SERVING_CFG, seed).eval()


# -- the caches ---------------------------------------------------------------------------------------

class KVCache:
    """Keys and values of `slots` sequences, each slot reserved up to max_len positions:
    (layers, slots, heads, max_len, head_dim) each. `lengths[s]`: positions slot s holds."""

    def __init__(self, layers: int, slots: int, heads: int, head_dim: int, max_len: int, device=None):
        shape = (layers, slots, heads, max_len, head_dim)
        self.k, self.v = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
        self.max_len, self.lengths = max_len, [0] * slots

    def reserve(self, slot: int, length: int) -> None:
        """Make room for `length` positions in `slot` (contiguous: it is there already, up to max_len)."""
        if length > self.max_len:
            raise ValueError(f"a sequence of {length} positions exceeds the model's block_size={self.max_len}")

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, heads, t, head_dim) of slots (B,) at positions (B, t)."""
        self.k[layer][slots[:, None], :, positions] = k.transpose(1, 2)
        self.v[layer][slots[:, None], :, positions] = v.transpose(1, 2)

    def read(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` cached positions of slots: (B, heads, length, head_dim) keys and values."""
        return self.k[layer][slots, :, :length], self.v[layer][slots, :, :length]

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0

    def reserved_positions(self) -> int:
        """Positions of memory held for the running sequences: a whole max_len per occupied slot."""
        return self.max_len * sum(length > 0 for length in self.lengths)


class PagedKVCache(KVCache):
    """Keys and values in blocks of `block` positions from one pool (layers, blocks, heads, block, head_dim);
    slot s's positions live in the blocks its block table lists, in order. A block is taken from the free
    list when a sequence crosses into it and given back when the sequence leaves."""

    def __init__(self, layers: int, slots: int, heads: int, head_dim: int, max_len: int, block: int = 8,
                 blocks: int | None = None, device=None):
        per_sequence = -(-max_len // block)
        blocks = blocks or slots * per_sequence
        shape = (layers, blocks, heads, block, head_dim)
        self.k, self.v = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
        self.max_len, self.lengths, self.block = max_len, [0] * slots, block
        self.free_blocks = list(reversed(range(blocks)))
        self.tables = [[] for _ in range(slots)]  # the block table: slot -> its blocks' ids, in position order
        self.table = torch.zeros(slots, per_sequence, dtype=torch.long, device=device)  # the same, as a tensor

    def reserve(self, slot: int, length: int) -> None:
        super().reserve(slot, length)
        table = self.tables[slot]
        while len(table) * self.block < length:
            if not self.free_blocks:
                raise RuntimeError(f"out of KV blocks: all {self.k.shape[1]} are in use (raise blocks=)")
            self.table[slot, len(table)] = self.free_blocks[-1]
            table.append(self.free_blocks.pop())

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        blocks, offsets = self.table[slots[:, None], positions // self.block], positions % self.block
        self.k[layer][blocks, :, offsets] = k.transpose(1, 2)
        self.v[layer][blocks, :, offsets] = v.transpose(1, 2)

    def read(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather each slot's blocks and lay them end to end (a shorter slot's extra blocks are masked later)."""
        ids = self.table[slots, :-(-length // self.block)]  # (B, blocks)

        def gather(pool: torch.Tensor) -> torch.Tensor:
            paged = pool[layer][ids].transpose(1, 2)  # (B, heads, blocks, block, head_dim)
            return paged.reshape(*paged.shape[:2], -1, paged.shape[-1])[:, :, :length]
        return gather(self.k), gather(self.v)

    def free(self, slot: int) -> None:
        super().free(slot)
        self.free_blocks += reversed(self.tables[slot])
        self.tables[slot] = []

    def reserved_positions(self) -> int:
        return self.block * sum(len(table) for table in self.tables)


def _attention(module: nn.Module) -> gpt.Attention:
    """The attention module itself, also inside a tensor-parallel region (whose f is the identity forward)."""
    return module.inner if isinstance(module, tp.ParallelRegion) else module


def cache_for(model: nn.Sequential, slots: int = 1, paged: bool = False, block: int = 8,
              blocks: int | None = None) -> KVCache:
    """An empty cache shaped for the model (a sharded model: its local heads only), on the model's device."""
    attn = _attention(model[1].attn)
    heads, device = attn.q.weight.shape[0] // attn.head_dim, attn.q.weight.device
    shape = (len(model) - 2, slots, heads, attn.head_dim, model[0].pos.num_embeddings)
    return PagedKVCache(*shape, block=block, blocks=blocks, device=device) if paged else KVCache(*shape, device=device)


# -- the cached forward -------------------------------------------------------------------------------

def hidden(positions: torch.Tensor, length: int) -> torch.Tensor:
    """(B, 1, t, length) True where a query at positions (B, t) must not see a cached position: the later ones
    (a shorter slot's unused or stale positions in a batch among them)."""
    return torch.arange(length, device=positions.device) > positions[:, None, :, None]


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d_h) v for queries q (B, h, t, d_h) over cached keys/values (B, h, L, d_h), the
    positions `masked` (from `hidden`) left out: each query sees the cached positions up to its own."""
    scores = q @ keys.transpose(-2, -1) / math.sqrt(q.size(-1))
    return scores.masked_fill(masked, float("-inf")).softmax(dim=-1) @ values


def attention_step(module: nn.Module, x: torch.Tensor, cache: KVCache, layer: int, slots: torch.Tensor,
                   positions: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """gpt.Attention for new positions x (B, t, d) only: their keys/values go into the cache, their queries
    attend to everything cached so far. Same weights, same arithmetic as the full causal forward."""
    attn = _attention(module)
    q, k, v = attn.heads(attn.q(x)), attn.heads(attn.k(x)), attn.heads(attn.v(x))
    cache.write(layer, slots, positions, k, v)
    keys, values = cache.read(layer, slots, masked.size(-1))
    out = attend(q, keys, values, masked).transpose(1, 2)
    return attn.proj(out.reshape(*x.shape[:2], -1))  # row-parallel in a sharded model: the all-reduce is here


@torch.no_grad()
def extend(model: nn.Sequential, cache: KVCache, slots: list[int], ids: torch.Tensor) -> torch.Tensor:
    """Run ids (B, t) as the next t positions of each slot (a prefill of t positions, or t = 1: one decode
    step for a batch); returns each slot's next-token logits (B, vocab)."""
    t, device = ids.size(1), ids.device
    starts = torch.tensor([cache.lengths[s] for s in slots], device=device)
    positions = starts[:, None] + torch.arange(t, device=device)
    for s in slots:
        cache.reserve(s, cache.lengths[s] + t)
    masked = hidden(positions, max(cache.lengths[s] for s in slots) + t)  # the batch reads its longest slot
    index = torch.tensor(slots, device=device)
    embedding = model[0]
    x = embedding.tok(ids) + embedding.pos(positions)
    for layer, block in enumerate(model[1:-1]):
        x = x + attention_step(block.attn, block.ln1(x), cache, layer, index, positions, masked)
        x = x + block.mlp(block.ln2(x))
    for s in slots:
        cache.lengths[s] += t
    return model[-1](x[:, -1])


# -- one request: with and without the cache ----------------------------------------------------------

@dataclass
class Generation:
    """A request's new tokens and the seconds each took (the first: the prefill, which yields token 1)."""

    tokens: torch.Tensor
    seconds: list[float]

    @property
    def prefill_s(self) -> float:
        return self.seconds[0]

    @property
    def decode_s(self) -> list[float]:
        return self.seconds[1:]


def _finished(t: torch.Tensor) -> torch.Tensor:
    """t, once the device has computed it (a GPU runs kernels asynchronously: the clock must wait for them)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return t


def _timed_tokens(step: Callable[[], torch.Tensor], n: int) -> Generation:
    tokens, seconds = [], []
    for _ in range(n):
        start = time.perf_counter()
        tokens.append(_finished(step()))
        seconds.append(time.perf_counter() - start)
    return Generation(torch.cat(tokens).cpu(), seconds)


@torch.no_grad()
def greedy_no_cache(model: nn.Sequential, prompt: torch.Tensor, new_tokens: int) -> Generation:
    """The reference: every new token runs the whole sequence so far through the model."""
    ids = prompt[None]

    def step() -> torch.Tensor:
        nonlocal ids
        token = model(ids)[:, -1].argmax(-1)
        ids = torch.cat([ids, token[:, None]], dim=1)
        return token
    return _timed_tokens(step, new_tokens)


@torch.no_grad()
def greedy_cached(model: nn.Sequential, prompt: torch.Tensor, new_tokens: int,
                  cache: KVCache | None = None) -> Generation:
    """Prefill the prompt once, then decode one position per token against the cache (slot 0)."""
    cache = cache or cache_for(model)
    last = prompt[None]

    def step() -> torch.Tensor:
        nonlocal last
        token = extend(model, cache, [0], last).argmax(-1)
        last = token[:, None]
        return token
    generation = _timed_tokens(step, new_tokens)
    cache.free(0)
    return generation


@torch.no_grad()
def step_costs(model: nn.Sequential, lengths: list[int], repeats: int = 15) -> dict[str, list[float]]:
    """Seconds to generate one token when the sequence already holds L positions, for each L in lengths, with
    and without the cache. The lengths and modes take turns and the fastest of `repeats` is kept, so that a
    busy spell on the machine slows every length alike."""
    ids = request_stream(1, prompt_lengths=(max(lengths) + 1, max(lengths) + 1))[0].prompt[None]
    ids = ids.to(model[0].tok.weight.device)
    cache = cache_for(model)
    extend(model, cache, [0], ids)

    def cached(n: int) -> torch.Tensor:
        cache.lengths[0] = n  # roll the cache back to n positions, then decode position n
        return extend(model, cache, [0], ids[:, n:n + 1])
    steps = {"no cache": lambda n: model(ids[:, :n + 1])[:, -1], "kv cache": cached}
    best = {mode: [math.inf] * len(lengths) for mode in steps}
    for _ in range(repeats):
        for i, n in enumerate(lengths):
            for mode, step in steps.items():
                start = time.perf_counter()
                _finished(step(n))
                best[mode][i] = min(best[mode][i], time.perf_counter() - start)
    return best


# -- a stream of requests and the server loops --------------------------------------------------------

@dataclass(frozen=True)
class Request:
    id: int
    arrival: float  # seconds after the stream starts
    prompt: torch.Tensor  # (prompt length,) character ids
    new_tokens: int


def request_stream(n: int = 32, rate: float | None = None, prompt_lengths: tuple[int, int] = (8, 64),
                   new_tokens: tuple[int, int] = (16, 64), seed: int = 0) -> list[Request]:
    """n requests, prompts (windows of the corpus) and output lengths drawn uniformly from the ranges, arriving
    as a Poisson stream of `rate` requests/s (None: all at once). The same seed gives the same stream."""
    if rate is not None and rate <= 0:
        raise ValueError(f"rate={rate} must be positive requests per second (or None: all at once)")
    g = torch.Generator().manual_seed(seed)
    windows = next(gpt.batches(n, prompt_lengths[1], seed))[0]
    lengths = torch.randint(prompt_lengths[0], prompt_lengths[1] + 1, (n,), generator=g).tolist()
    outputs = torch.randint(new_tokens[0], new_tokens[1] + 1, (n,), generator=g).tolist()
    gaps = torch.empty(n).exponential_(rate, generator=g) if rate else torch.zeros(n)
    arrivals = (gaps.cumsum(0) - gaps[0]).tolist()
    return [Request(i, arrivals[i], windows[i, :lengths[i]], outputs[i]) for i in range(n)]


@dataclass
class Served:
    """What happened to one request: when it arrived, got its first token and finished (s after the start)."""

    id: int
    arrival: float
    first_token: float
    finished: float
    prefill_s: float
    tokens: list[int] = field(default_factory=list)


def _wait_until(t0: float, arrival: float) -> None:
    time.sleep(max(0.0, arrival - (time.perf_counter() - t0)))


def serve_one_at_a_time(model: nn.Sequential, stream: list[Request], cached: bool = True) -> dict:
    """Requests in arrival order, one at a time, each to its end (with or without the KV cache)."""
    device, t0, served = model[0].tok.weight.device, time.perf_counter(), []
    cache = cache_for(model) if cached else None
    for r in sorted(stream, key=lambda r: r.arrival):
        _wait_until(t0, r.arrival)
        start = time.perf_counter() - t0
        prompt = r.prompt.to(device)
        g = greedy_cached(model, prompt, r.new_tokens, cache) if cached else \
            greedy_no_cache(model, prompt, r.new_tokens)
        served.append(Served(r.id, r.arrival, start + g.prefill_s, start + sum(g.seconds), g.prefill_s,
                             g.tokens.tolist()))
    return dict(served=served, steps=[])


@dataclass
class _Running:
    request: Request
    record: Served


def _join(model: nn.Sequential, cache: KVCache, request: Request, slot: int, t0: float) -> _Running:
    """Prefill the request into its slot: its first token, and the time it came."""
    start = time.perf_counter()
    token = int(extend(model, cache, [slot], request.prompt[None].to(model[0].tok.weight.device)).argmax(-1))
    end = time.perf_counter()
    return _Running(request, Served(request.id, request.arrival, end - t0, end - t0, end - start, [token]))


def _decode_step(model: nn.Sequential, cache: KVCache, running: dict[int, _Running]) -> int:
    """One decode step for every running request that still wants tokens, as one batch; returns its size."""
    slots = [s for s, run in running.items() if len(run.record.tokens) < run.request.new_tokens]
    if slots:
        last = torch.tensor([[running[s].record.tokens[-1]] for s in slots], device=model[0].tok.weight.device)
        for s, token in zip(slots, extend(model, cache, slots, last).argmax(-1).tolist()):
            running[s].record.tokens.append(token)
    return len(slots)


def serve_batched(model: nn.Sequential, stream: list[Request], max_batch: int = 16, paged: bool = False,
                  agree: Callable[[int], int] = int) -> dict:
    """Continuous batching: at every step the arrived requests join (prefill, up to max_batch running), then
    one decode step runs the whole batch, then the finished leave. `agree` turns this process's count of
    joiners into the count every rank uses (tensor parallel: rank 0's, broadcast). Returns each request's
    record and each step's batch (size, joined, left, KV positions reserved and used)."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be at least 1")
    cache, waiting = cache_for(model, max_batch, paged), deque(sorted(stream, key=lambda r: r.arrival))
    free, running, served, steps = list(reversed(range(max_batch))), {}, [], []
    t0 = time.perf_counter()
    while waiting or running:
        now = time.perf_counter() - t0
        joined = agree(sum(1 for r in list(waiting)[:len(free)] if r.arrival <= now))
        if not running and not joined:
            time.sleep(min(1e-3, max(0.0, waiting[0].arrival - now)))
            continue
        for _ in range(joined):
            slot = free.pop()
            running[slot] = _join(model, cache, waiting.popleft(), slot, t0)
        step = dict(step=len(steps), batch=_decode_step(model, cache, running), joined=joined,
                    reserved=cache.reserved_positions(), used=sum(cache.lengths))
        done = [s for s, run in running.items() if len(run.record.tokens) == run.request.new_tokens]
        for s in done:
            run = running.pop(s)
            run.record.finished = time.perf_counter() - t0
            served.append(run.record)
            cache.free(s)
            free.append(s)
        steps.append(dict(step, left=len(done), t=time.perf_counter() - t0))
    return dict(served=sorted(served, key=lambda s: s.id), steps=steps)


def serve(model: nn.Sequential, stream: list[Request], mode: str = "batching", max_batch: int = 16,
          paged: bool = False) -> dict:
    """One of MODES on this process: "no cache" and "kv cache" one request at a time, "batching" continuous."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    if mode == "batching":
        return serve_batched(model, stream, max_batch, paged)
    return serve_one_at_a_time(model, stream, cached=mode == "kv cache")


def metrics(served: list[Served]) -> dict:
    """Time to first token, per-request latency (p50, p95, ms) and tokens/s over the whole stream."""
    ttft = [1e3 * (s.first_token - s.arrival) for s in served]
    latency = [1e3 * (s.finished - s.arrival) for s in served]
    span = max(s.finished for s in served) - min(s.arrival for s in served)
    return dict(ttft_p50_ms=float(np.percentile(ttft, 50)), ttft_p95_ms=float(np.percentile(ttft, 95)),
                latency_p50_ms=float(np.percentile(latency, 50)), latency_p95_ms=float(np.percentile(latency, 95)),
                tokens_per_s=sum(len(s.tokens) for s in served) / span,
                prefill_ms=1e3 * float(np.mean([s.prefill_s for s in served])))


# -- tensor-parallel decoding on ranks ----------------------------------------------------------------

@tp.whole_heads
@torch.no_grad()
def serve_tensor_parallel(ctx, stream: list[Request] | None = None, max_batch: int = 16, seed: int = 0) -> dict:
    """Continuous batching of the stream (default: `request_stream()`) with the GPT's heads and MLP units split
    over all ranks; rank 0 decides who joins and broadcasts it. Returns the records (equal on every rank),
    the all-reduces each rank ran and its heads."""
    reduce = tp.GroupAllReduce(ctx)
    model = tp.tp_gpt(serving_model(seed), ctx.rank, ctx.world_size, reduce).to(ctx.device).eval()
    stream = stream or request_stream()

    def agree(joined: int) -> int:
        return int(ctx.comm.broadcast(torch.tensor([joined], device=ctx.device), src=0, tag="schedule").item())

    greedy_cached(model, stream[0].prompt.to(ctx.device), 2)  # warm-up (the ranks run it in step)
    reduce.count = 0
    ctx.comm.barrier()
    result = serve_batched(model, stream, max_batch, agree=agree)
    return dict(result, all_reduces=reduce.count, heads=cache_for(model).k.shape[2])
