"""Context (sequence) parallelism: one long sequence split across ranks, attention computed without any rank
ever holding all of it.

Ring attention (Liu, Zaharia & Abbeel, 2023, https://arxiv.org/abs/2310.01889): each rank keeps its queries;
the key/value blocks travel around the ring (isend right, irecv left, the next transfer overlapping the
current block's compute), and each rank folds every block into its output with the online-softmax merge:
a block's partial output and its log-sum-exp are enough to combine it exactly with the others. The
backward is written by hand, like FlashAttention's: the keys and values go round the ring again with
their gradients dK, dV riding along, and one last hop brings each rank its own.
  bytes sent per rank: forward (N-1)·2·S, backward (N-1)·4·S + 2·S   (S: one rank's K, in bytes)
The sequence is cut into 2N chunks and each rank holds two. With a causal mask, the contiguous split
(rank r holds chunks 2r, 2r+1) gives rank r 4r+3 blocks of work, the last rank (4N-1)/3 times the
first's; the zig-zag split (chunks r and 2N-1-r) gives every rank 2N+1, the same total work placed evenly.

DeepSpeed-Ulysses (Jacobs et al., 2023, https://arxiv.org/abs/2309.14509): an all-to-all turns
"all heads, 1/N of the sequence" into "1/N of the heads, all of the sequence" for q, k and v; each
rank runs ordinary attention on its heads; a fourth all-to-all turns the output back.
  bytes sent per rank: 4·(N-1)/N·S forward, the same backward (an all-to-all's adjoint is an all-to-all)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .. import gpt
from ..ranks import world_sizes

LAYOUTS = ("contiguous", "zigzag")
METHODS = ("ring", "ulysses")


# -- which part of the sequence each rank holds ------------------------------------------------------------

def chunks_of(rank: int, world_size: int, layout: str = "contiguous") -> list[int]:
    """The two chunks (of 2N) rank `rank` holds: [2r, 2r+1] (contiguous) or [r, 2N-1-r] (zig-zag)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return [2 * rank, 2 * rank + 1] if layout == "contiguous" else [rank, 2 * world_size - 1 - rank]


def positions(rank: int, world_size: int, seq_len: int, layout: str = "contiguous") -> torch.Tensor:
    """The token positions rank `rank` holds, in the order its local tensor stores them."""
    n_chunks = 2 * world_size
    if seq_len % n_chunks:
        raise ValueError(f"seq_len={seq_len} must be divisible by {n_chunks} chunks ({layout}, {world_size} ranks)")
    size = seq_len // n_chunks
    return torch.cat([torch.arange(c * size, (c + 1) * size) for c in chunks_of(rank, world_size, layout)])


# -- attention on one block, and the online-softmax merge --------------------------------------------------

def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ/√d) v over this block of keys only, with its log-sum-exp per query (…, t_q, 1):
    the two numbers the merge needs. `causal`: the block is on the diagonal (same positions)."""
    scores = _scores(q, k, causal)
    lse = scores.logsumexp(dim=-1, keepdim=True)
    return (scores - lse).exp() @ v, lse


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if causal:
        t = q.size(-2)
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return scores


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
          lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial attentions of the same queries over disjoint keys, combined exactly: each was normalised
    by its own sum of exponentials, so reweight each by its share exp(lse_x - lse) of the total."""
    lse = torch.logaddexp(lse_a, lse_b)
    return (lse_a - lse).exp() * out_a + (lse_b - lse).exp() * out_b, lse


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention on one process: the reference."""
    return block_attention(q, k, v, causal=True)[0]


# -- what a rank sends and computes ------------------------------------------------------------------------

@dataclass
class Traffic:
    """Bytes this rank sent, by phase ("forward", "backward"); work (score entries) and compute seconds."""

    sent: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    work: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    seconds: dict[str, float] = field(default_factory=lambda: {"forward": 0.0, "backward": 0.0})

    def as_dict(self) -> dict:
        return {"sent": dict(self.sent), "work": dict(self.work), "seconds": dict(self.seconds)}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _shift(tensor: torch.Tensor, rank: int, n: int) -> tuple[torch.Tensor, list]:
    """Start sending `tensor` to the right neighbour and receiving the left one's: (buffer, works)."""
    incoming = torch.empty_like(tensor)
    return incoming, [dist.isend(tensor, (rank + 1) % n), dist.irecv(incoming, (rank - 1) % n)]


def _finish(works: list) -> None:
    for work in works:
        work.wait()


@dataclass
class Ring:
    """Where this rank sits in the ring and how the sequence is split; `traffic` collects what it did."""

    rank: int
    world_size: int
    layout: str = "contiguous"
    traffic: Traffic = field(default_factory=Traffic)

    def chunks(self, rank: int) -> list[int]:
        return chunks_of(rank, self.world_size, self.layout)


def _pairs(ring: Ring, source: int):
    """(query chunk index, key chunk index, causal?) for every block pair a causal mask leaves visible:
    a key chunk after the query chunk is skipped; that skipped work is the causal imbalance."""
    for qi, qc in enumerate(ring.chunks(ring.rank)):
        for ki, kc in enumerate(ring.chunks(source)):
            if kc <= qc:
                yield qi, ki, kc == qc


class RingAttention(torch.autograd.Function):
    """Causal attention of this rank's q over every rank's k, v, passed around the ring (hand-written
    forward and backward)."""

    @staticmethod
    def forward(fctx, q, k, v, ring: Ring):
        n, traffic = ring.world_size, ring.traffic
        q_parts = q.chunk(len(ring.chunks(ring.rank)), dim=-2)
        outs = [torch.zeros_like(p) for p in q_parts]
        lses = [torch.full((*p.shape[:-1], 1), float("-inf"), dtype=q.dtype, device=q.device) for p in q_parts]
        kv = torch.stack([k, v]).contiguous()
        for step in range(n):
            if step < n - 1:  # the next block is on the wire while this one is computed
                incoming, works = _shift(kv, ring.rank, n)
                traffic.sent["forward"] += _nbytes(kv)
            start = time.perf_counter()
            k_parts, v_parts = kv[0].chunk(len(q_parts), dim=-2), kv[1].chunk(len(q_parts), dim=-2)
            for qi, ki, causal in _pairs(ring, (ring.rank - step) % n):
                out, lse = block_attention(q_parts[qi], k_parts[ki], v_parts[ki], causal)
                outs[qi], lses[qi] = merge(outs[qi], lses[qi], out, lse)
                traffic.work["forward"] += q_parts[qi][..., 0].numel() * k_parts[ki].size(-2)
            traffic.seconds["forward"] += time.perf_counter() - start
            if step < n - 1:
                _finish(works)
                kv = incoming
        out, lse = torch.cat(outs, dim=-2), torch.cat(lses, dim=-2)
        fctx.save_for_backward(q, k, v, out, lse)
        fctx.ring = ring
        return out

    @staticmethod
    def backward(fctx, dout):
        q, k, v, out, lse = fctx.saved_tensors
        ring = fctx.ring
        n, traffic, parts = ring.world_size, ring.traffic, len(ring.chunks(ring.rank))
        dq = torch.zeros_like(q)
        delta = (dout * out).sum(dim=-1, keepdim=True)  # rowsum(dO ∘ O): softmax's backward term
        split = [t.chunk(parts, dim=-2) for t in (q, dout, lse, delta, dq)]
        held = torch.stack([k, v, torch.zeros_like(k), torch.zeros_like(v)]).contiguous()  # k, v, dk, dv
        for step in range(n):
            start = time.perf_counter()
            kp, vp, dkp, dvp = (held[i].chunk(parts, dim=-2) for i in range(4))
            for qi, ki, causal in _pairs(ring, (ring.rank - step) % n):
                qs, dos, lses, deltas, dqs = (t[qi] for t in split)
                p = (_scores(qs, kp[ki], causal) - lses).exp()
                dvp[ki].add_(p.transpose(-2, -1) @ dos)
                ds = p * (dos @ vp[ki].transpose(-2, -1) - deltas) / math.sqrt(q.size(-1))
                dqs.add_(ds @ kp[ki])
                dkp[ki].add_(ds.transpose(-2, -1) @ qs)
                traffic.work["backward"] += qs[..., 0].numel() * kp[ki].size(-2)
            traffic.seconds["backward"] += time.perf_counter() - start
            outgoing = held if step < n - 1 else held[2:].contiguous()  # the last hop carries dk, dv home
            incoming, works = _shift(outgoing, ring.rank, n)
            traffic.sent["backward"] += _nbytes(outgoing)
            _finish(works)
            held = incoming
        dk, dv = held[-2], held[-1]
        return dq, dk, dv, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring) -> torch.Tensor:
    """This rank's causal attention output over the whole sequence; q, k, v: (batch, heads, t/N, head_dim)."""
    return RingAttention.apply(q, k, v, ring)


# -- DeepSpeed-Ulysses: heads <-> sequence with all-to-all -------------------------------------------------

class AllToAll(torch.autograd.Function):
    """dist.all_to_all_single along dim 0 (chunk j goes to rank j); its backward is the same exchange."""

    @staticmethod
    def forward(fctx, x, traffic: Traffic | None):
        fctx.traffic = traffic
        return _all_to_all(x, traffic, "forward")

    @staticmethod
    def backward(fctx, grad):
        return _all_to_all(grad, fctx.traffic, "backward"), None


def _all_to_all(x: torch.Tensor, traffic: Traffic | None, phase: str) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    if traffic is not None:  # the chunk a rank keeps for itself does not cross the wire
        traffic.sent[phase] += _nbytes(x) * (x.size(0) - 1) // x.size(0)
    return out


def all_to_all(x: torch.Tensor, traffic: Traffic | None = None) -> torch.Tensor:
    return AllToAll.apply(x, traffic)


def heads_to_sequence(x: torch.Tensor, n: int, traffic: Traffic) -> torch.Tensor:
    """(b, h, t/N, d) holding all heads of this rank's positions -> (b, h/N, t, d): its heads, all positions."""
    b, h, t_local, d = x.shape
    sent = x.reshape(b, n, h // n, t_local, d).transpose(0, 1)  # chunk j: the heads rank j will own
    got = all_to_all(sent, traffic)  # chunk i: rank i's positions of my heads
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * t_local, d)


def sequence_to_heads(x: torch.Tensor, n: int, traffic: Traffic) -> torch.Tensor:
    """The inverse: (b, h/N, t, d) -> (b, h, t/N, d)."""
    b, h_local, t, d = x.shape
    sent = x.reshape(b, h_local, n, t // n, d).permute(2, 0, 1, 3, 4)  # chunk j: rank j's positions
    got = all_to_all(sent, traffic)  # chunk i: my positions of rank i's heads
    return got.transpose(0, 1).reshape(b, n * h_local, t // n, d)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring) -> torch.Tensor:
    """Causal attention by re-sharding: 3 all-to-alls in, ordinary attention on h/N heads, 1 out."""
    n = ring.world_size
    if ring.layout != "contiguous":
        raise ValueError("ulysses gathers the sequence in rank order: use layout='contiguous'")
    if q.size(1) % n:
        raise ValueError(f"ulysses needs the world size ({n}) to divide the number of heads ({q.size(1)})")
    q, k, v = (heads_to_sequence(t, n, ring.traffic) for t in (q, k, v))
    start = time.perf_counter()
    out = full_attention(q, k, v)
    ring.traffic.seconds["forward"] += time.perf_counter() - start
    ring.traffic.work["forward"] += q[..., 0].numel() * q.size(-2)
    return sequence_to_heads(out, n, ring.traffic)


CORES = {"ring": ring_attention, "ulysses": ulysses_attention}


class SequenceParallelAttention(nn.Module):
    """The tiny GPT's Attention with its q, k, v, proj weights, run on this rank's part of the sequence."""

    def __init__(self, attn: gpt.Attention, ring: Ring, method: str = "ring"):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.attn, self.ring, self.core = attn, ring, CORES[method]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        out = self.core(a.heads(a.q(x)), a.heads(a.k(x)), a.heads(a.v(x)), self.ring).transpose(1, 2)
        return a.proj(out.reshape(*out.shape[:2], -1))


# -- one step on ranks, and its one-process reference ------------------------------------------------------

def attention_setup(batch: int = 2, seq_len: int = 64, seed: int = 0) -> tuple[gpt.Attention, torch.Tensor]:
    """The tiny GPT's first attention layer (context length seq_len) and a random input (batch, seq_len, d)."""
    cfg = gpt.GPTConfig(block_size=seq_len, n_layer=1)
    attn = gpt.gpt(cfg, seed)[1].attn
    x = torch.randn(batch, seq_len, cfg.d_model, generator=torch.Generator().manual_seed(seed + 1))
    return attn, x


def full_step(batch: int = 2, seq_len: int = 64, seed: int = 0) -> dict:
    """gpt.Attention on the whole sequence in this process; loss = sum(out²): output and gradients."""
    attn, x = attention_setup(batch, seq_len, seed)
    x.requires_grad_()
    out = attn(x)
    out.pow(2).sum().backward()
    return dict(out=out.detach(), dx=x.grad, grads={n: p.grad for n, p in attn.named_parameters()})


def _splits(n: int, method: str = "ring", seq_len: int = 64, **_) -> bool:
    """Whether n ranks can split this sequence: 2n equal chunks; Ulysses also splits the heads n ways."""
    return seq_len % (2 * n) == 0 and (method != "ulysses" or gpt.GPTConfig().n_head % n == 0)


@world_sizes(_splits, "the sequence is cut into 2N equal chunks (and Ulysses splits the tiny GPT's 4 heads N ways)")
def attention_step(ctx, method: str = "ring", layout: str = "contiguous", batch: int = 2, seq_len: int = 64,
                   seed: int = 0, repeats: int = 1) -> dict:
    """Forward and backward of sequence-parallel attention on this rank's positions; the weights' gradients
    are summed over ranks (each rank saw part of the sequence). Seconds: the fastest of `repeats`, per phase."""
    attn, x = attention_setup(batch, seq_len, seed)
    mine = positions(ctx.rank, ctx.world_size, seq_len, layout)
    steps, traffics = [], []
    for _ in range(repeats):
        ring = Ring(ctx.rank, ctx.world_size, layout)
        layer = SequenceParallelAttention(attn.to(ctx.device), ring, method)
        attn.zero_grad()
        xs = x[:, mine].to(ctx.device).requires_grad_()
        dist.barrier()
        start = time.perf_counter()
        out = layer(xs)
        out.pow(2).sum().backward()
        steps.append(time.perf_counter() - start)
        traffics.append(ring.traffic)
    for p in attn.parameters():
        dist.all_reduce(p.grad)
    measured = traffics[-1].as_dict()  # bytes and work are the same every repeat; seconds: the least disturbed
    measured["seconds"] = {phase: min(t.seconds[phase] for t in traffics) for phase in measured["seconds"]}
    return dict(positions=mine, out=out.detach().cpu(), dx=xs.grad.cpu(), step_seconds=min(steps),
                grads={n: p.grad.cpu() for n, p in attn.named_parameters()}, local_bytes=_nbytes(xs), **measured)


def predicted_bytes(method: str, world_size: int, local_bytes: int) -> dict[str, int]:
    """Bytes one rank sends per step (the module docstring's formulas); local_bytes: its q (or k, v) shard."""
    n, s = world_size, local_bytes
    if method == "ring":
        return {"forward": (n - 1) * 2 * s, "backward": (n - 1) * 4 * s + 2 * s}
    return {"forward": 4 * (n - 1) * s // n, "backward": 4 * (n - 1) * s // n}


# -- the built-in: torch.distributed.tensor.experimental.context_parallel ----------------------------------

@world_sizes(_splits, "context_parallel's load-balanced split cuts the sequence into 2N equal chunks")
def builtin_context_parallel(ctx, batch: int = 1, heads: int = 4, seq_len: int = 64, head_dim: int = 16) -> dict:
    """torch's context_parallel around F.scaled_dot_product_attention (a DTensor ring of its own), against
    one process. Where torch cannot run it (on CPU no sharding rule is registered for the CPU SDPA kernel),
    returns the reason instead of a result."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.tensor.experimental import context_parallel
    except ImportError as missing:
        return dict(ran=False, reason=f"torch {torch.__version__} has no context_parallel ({missing})")
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, generator=generator).to(ctx.device) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    buffers = [t.clone() for t in (q, k, v, expected)]
    try:
        with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2]):
            out = F.scaled_dot_product_attention(*buffers[:3], is_causal=True)
    except NotImplementedError as refused:
        return dict(ran=False, reason=f"{type(refused).__name__}: {str(refused).strip().splitlines()[-1]}")
    return dict(ran=True, difference=float((out - buffers[3]).abs().max()))
