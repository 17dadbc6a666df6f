"""Collectives written from point-to-point send/recv only: naive, ring and recursive-doubling
all-reduce, binomial-tree broadcast, ring all-gather.

They take torch.distributed's calling convention (in place on the tensor passed, default group) and
return it. Pass `events=ctx.comm.events()` (distlab/comm.py) to record every send and receive: who, to whom,
which chunk, in which step, when, how many bytes.
"""

from __future__ import annotations

import time
from functools import partial

import torch
import torch.distributed as dist

from ..comm import Events, nbytes

REDUCE = {
    dist.ReduceOp.SUM: torch.Tensor.add_,
    dist.ReduceOp.PRODUCT: torch.Tensor.mul_,
    dist.ReduceOp.MAX: lambda into, other: torch.maximum(into, other, out=into),
    dist.ReduceOp.MIN: lambda into, other: torch.minimum(into, other, out=into),
}


def _reducer(op):
    if op not in REDUCE:
        raise ValueError(f"op must be one of dist.ReduceOp.SUM, PRODUCT, MAX, MIN, got {op!r}")
    return REDUCE[op]


def _transfer(kind: str, tensor: torch.Tensor, peer: int, events: Events | None, chunk: int, step: int,
              phase: str) -> None:
    """One blocking send or receive, recorded."""
    start = time.time()
    (dist.send if kind == "send" else dist.recv)(tensor, peer)
    if events is not None:
        events.add(kind, peer, nbytes(tensor), chunk, step, phase, start, time.time())


def _exchange(send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, events: Events | None,
              chunk: int, recv_chunk: int, step: int, phase: str) -> None:
    """Send and receive at the same time (isend/irecv pair), so neither direction waits for the other."""
    start = time.time()
    sending, receiving = dist.isend(send, dst), dist.irecv(recv, src)
    for kind, work, tensor, peer, index in (("send", sending, send, dst, chunk),
                                            ("recv", receiving, recv, src, recv_chunk)):
        work.wait()
        if events is not None:
            events.add(kind, peer, nbytes(tensor), index, step, phase, start, time.time())


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D view of the tensor (a copy when it is not contiguous; the caller copies back)."""
    return tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1).clone()


def _done(tensor: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    if flat.data_ptr() != tensor.data_ptr():
        tensor.copy_(flat.view_as(tensor))
    return tensor


# -- naive: everything through one rank ---------------------------------------------------------------

def naive_all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, events: Events | None = None) -> torch.Tensor:
    """Every rank sends its tensor to rank 0, which reduces and sends the result back to each.

    Rank 0 moves (N-1)·S each way while the others move S: it is the bottleneck as N grows.
    """
    reduce, rank, n = _reducer(op), dist.get_rank(), dist.get_world_size()
    flat = _flat(tensor)
    if rank == 0:
        incoming = torch.empty_like(flat)
        for src in range(1, n):
            _transfer("recv", incoming, src, events, chunk=src, step=src - 1, phase="gather")
            reduce(flat, incoming)
        for dst in range(1, n):
            _transfer("send", flat, dst, events, chunk=0, step=n - 2 + dst, phase="broadcast")
    elif n > 1:
        _transfer("send", flat, 0, events, chunk=rank, step=rank - 1, phase="gather")
        _transfer("recv", flat, 0, events, chunk=0, step=n - 2 + rank, phase="broadcast")
    return _done(tensor, flat)


# -- ring: reduce-scatter, then all-gather (Patarasuk & Yuan 2009; Baidu, Horovod) ---------------------

SEGMENT_BYTES = 4 << 20  # big chunks travel in segments of this size: adding one overlaps the next one's transfer


def _reduce_pipelined(send: torch.Tensor, dst: int, into: torch.Tensor, buffer: torch.Tensor, src: int, reduce,
                      events: Events | None, chunk: int, into_chunk: int, step: int, phase: str) -> None:
    """Send one chunk and receive another into `buffer`, segment by segment, reducing each received
    segment into `into` while the later ones are still on the wire. Both sides cut the same segments."""
    start = time.time()
    sends = [dist.isend(seg, dst) for seg in send.tensor_split(_segments(send))]
    pieces = zip(buffer.tensor_split(_segments(into)), into.tensor_split(_segments(into)))
    receives = [(dist.irecv(incoming, src), incoming, target) for incoming, target in pieces]
    for work, incoming, target in receives:
        work.wait()
        reduce(target, incoming)
    if events is not None:
        events.add("recv", src, nbytes(into), into_chunk, step, phase, start, time.time())
    for work in sends:
        work.wait()
    if events is not None:
        events.add("send", dst, nbytes(send), chunk, step, phase, start, time.time())


def _segments(chunk: torch.Tensor) -> int:
    return max(1, min(chunk.numel(), -(-nbytes(chunk) // SEGMENT_BYTES)))


_scratch_buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _scratch(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A receive buffer of `like`'s dtype on its device, kept between calls: a fresh 32 MB one would cost
    its page faults every time."""
    key = (like.dtype, like.device)
    buffer = _scratch_buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch_buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buffer[:numel]


def _ring_pass(parts: list[torch.Tensor], start: int, events: Events | None, phase: str,
               reduce=None, first_step: int = 0) -> None:
    """N-1 steps around the ring: at step s send parts[start - s] right, receive parts[start - s - 1]
    from the left, reducing into it (reduce-scatter) or overwriting it (all-gather)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % n, (rank - 1) % n
    buffer = _scratch(max(p.numel() for p in parts), parts[0]) if reduce else None
    for s in range(n - 1):
        out, into = (start - s) % n, (start - s - 1) % n
        if reduce:
            incoming = buffer[: parts[into].numel()]
            _reduce_pipelined(parts[out], right, parts[into], incoming, left, reduce, events, out, into,
                              first_step + s, phase)
        else:
            _exchange(parts[out], right, parts[into], left, events, out, into, first_step + s, phase)


def ring_all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, events: Events | None = None) -> torch.Tensor:
    """Split into N chunks; reduce-scatter leaves rank r owning the reduced chunk r+1, all-gather
    passes the reduced chunks around. Each rank sends 2(N-1)/N·S, whatever N is: bandwidth-optimal."""
    reduce, rank, n = _reducer(op), dist.get_rank(), dist.get_world_size()
    flat = _flat(tensor)
    if n > 1:
        chunks = list(flat.tensor_split(n))  # views: the chunks are reduced in place
        _ring_pass(chunks, rank, events, "reduce-scatter", reduce)
        _ring_pass(chunks, rank + 1, events, "all-gather", first_step=n - 1)
    return _done(tensor, flat)


def all_gather(tensor_list: list[torch.Tensor], tensor: torch.Tensor,
               events: Events | None = None) -> list[torch.Tensor]:
    """Ring all-gather: tensor_list[r] gets rank r's tensor on every rank (as dist.all_gather)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    if len(tensor_list) != n:
        raise ValueError(f"tensor_list must hold world_size={n} tensors, got {len(tensor_list)}")
    tensor_list[rank].copy_(tensor)
    if n > 1:
        _ring_pass(tensor_list, rank, events, "all-gather")
    return tensor_list


# -- recursive doubling: log2(N) rounds of pairwise exchange (Thakur, Rabenseifner & Gropp 2005) --------

def recursive_doubling_all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM,
                                  events: Events | None = None) -> torch.Tensor:
    """In round k rank r swaps its whole vector with rank r XOR 2^k and reduces: log2(N) rounds.

    With N not a power of two, the P = 2^floor(log2 N) first ranks do the rounds; each rank past P
    first folds its vector into rank r - P and gets the result back at the end.
    """
    reduce, rank, n = _reducer(op), dist.get_rank(), dist.get_world_size()
    power = 1 << (n.bit_length() - 1)
    rounds = power.bit_length() - 1
    flat = _flat(tensor)
    if rank >= power:
        _transfer("send", flat, rank - power, events, chunk=0, step=0, phase="fold in")
        _transfer("recv", flat, rank - power, events, chunk=0, step=rounds + 1, phase="fold out")
        return _done(tensor, flat)
    incoming = torch.empty_like(flat)
    if rank + power < n:
        _transfer("recv", incoming, rank + power, events, chunk=0, step=0, phase="fold in")
        reduce(flat, incoming)
    for k in range(rounds):
        partner = rank ^ (1 << k)
        _exchange(flat, partner, incoming, partner, events, 0, 0, step=k + 1, phase=f"round {k}")
        reduce(flat, incoming)  # commutative: both partners end bit-identical
    if rank + power < n:
        _transfer("send", flat, rank + power, events, chunk=0, step=rounds + 1, phase="fold out")
    return _done(tensor, flat)


# -- broadcast: a binomial tree, ceil(log2 N) rounds ------------------------------------------------------

def broadcast(tensor: torch.Tensor, src: int = 0, events: Events | None = None) -> torch.Tensor:
    """In round k the ranks that have the data (relative rank < 2^k) send it 2^k ranks further."""
    rank, n = dist.get_rank(), dist.get_world_size()
    if not 0 <= src < n:
        raise ValueError(f"src must be a rank in 0..{n - 1}, got {src}")
    flat = _flat(tensor)
    me, step, mask = (rank - src) % n, 0, 1
    while mask < n:
        if me < mask and me + mask < n:
            _transfer("send", flat, (me + mask + src) % n, events, chunk=0, step=step, phase="broadcast")
        elif mask <= me < 2 * mask:
            _transfer("recv", flat, (me - mask + src) % n, events, chunk=0, step=step, phase="broadcast")
        mask, step = mask * 2, step + 1
    return _done(tensor, flat)


ALL_REDUCES = {"naive": naive_all_reduce, "ring": ring_all_reduce, "recursive_doubling": recursive_doubling_all_reduce}


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, algorithm: str = "ring",
               events: Events | None = None) -> torch.Tensor:
    """dist.all_reduce written from send/recv; algorithm: "naive", "ring" or "recursive_doubling"."""
    if algorithm not in ALL_REDUCES:
        raise ValueError(f"algorithm must be one of {tuple(ALL_REDUCES)}, got {algorithm!r}")
    return ALL_REDUCES[algorithm](tensor, op, events)


# -- measuring: the times the alpha-beta model is fitted to (a rank function for dl.launch) ------------

def time_all_reduces(ctx, sizes: list[int],
                     algorithms: tuple[str, ...] = ("naive", "ring", "recursive_doubling", "gloo"),
                     repeats: int = 3) -> list[dict]:
    """Seconds of each all-reduce per message size in bytes (float32): the slowest rank's median of
    `repeats` calls, each started together after a barrier. The algorithms take turns, call by call,
    so a burst of load on a shared machine hits them all alike."""
    rows = []
    for size in sizes:
        tensor = torch.ones(max(1, size // 4))
        calls = {a: partial(dist.all_reduce, tensor) if a == "gloo" else partial(all_reduce, tensor, algorithm=a)
                 for a in algorithms}
        times: dict[str, list[float]] = {a: [] for a in algorithms}
        for _ in range(repeats):
            for algorithm, call in calls.items():
                dist.barrier()
                start = time.perf_counter()
                call()
                times[algorithm].append(time.perf_counter() - start)
        medians = torch.tensor([sorted(times[a])[repeats // 2] for a in algorithms], dtype=torch.float64)
        dist.all_reduce(medians, op=dist.ReduceOp.MAX)
        rows += [{"algorithm": a, "bytes": nbytes(tensor), "world_size": ctx.world_size, "seconds": t, "calls": repeats}
                 for a, t in zip(algorithms, medians.tolist())]
    return rows
