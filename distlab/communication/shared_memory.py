"""All-reduce through shared memory: the ring's two phases without a wire, for ranks on one machine.

gloo moves a tensor between two local processes through loopback TCP: copied into a socket, through
the kernel, out again. Ranks on one machine can instead map the same memory, and a transfer becomes a
memcpy. NCCL does this between GPUs of one box (and NVLink beyond), MPI between local processes
(MPICH's and Open MPI's shared-memory transports); here it is written out:

    slot 0 | slot 1 | ... | slot N-1        one region of `capacity` bytes per rank, in one mapping

1. publish:        rank r copies every chunk c != r of its tensor into slot r      (N-1)/N·S bytes
2. reduce-scatter: rank r sums chunk r of its own tensor and of every other slot,
                   into chunk r of its own slot                                  (N-1) reads of S/N
3. all-gather:     rank r copies chunk c of slot c into its tensor, for every c             S bytes

with the process group's barrier between the phases (and before the next call reuses the slots).
Each chunk is summed once, by one rank, so every rank ends with the same bits. A tensor larger than
`capacity` goes through in segments.

The mapping is owner-only (DESIGN.md, "On a shared server"): rank 0 creates a 0600 file in a fresh 0700
folder under /dev/shm, every local rank maps it, and rank 0 removes file and folder as soon as all have
mapped it: nothing is left for another user to open, and nothing stays behind after a crash.
"""

from __future__ import annotations

import mmap
import os
import socket
import stat
import tempfile
import time
from functools import partial

import torch
import torch.distributed as dist

OUT_OF_PLACE = {  # reduce(a, b, out=c): the sum goes straight into the slot, no extra copy
    dist.ReduceOp.SUM: torch.add,
    dist.ReduceOp.PRODUCT: torch.mul,
    dist.ReduceOp.MAX: torch.maximum,
    dist.ReduceOp.MIN: torch.minimum,
}
ALIGN = 64  # bytes: a cache line, and enough for any dtype's view
DEFAULT_CAPACITY = 64 << 20  # bytes per rank


def shm_folder() -> str:
    """Where the mapping's file lives for the instant before it is removed: memory-backed /dev/shm if any."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _create_owner_only(size: int) -> tuple[str, tuple[int, int]]:
    """A new file of `size` bytes, mode 0600, in a new folder of mode 0700, whatever the umask; returns its
    path and the (folder, file) modes as created."""
    folder = tempfile.mkdtemp(prefix="distlab-shm-", dir=shm_folder())  # 0700, a name nobody can guess
    path = os.path.join(folder, "buffer")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only remove bits; this says what they are
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path, (stat.S_IMODE(os.stat(folder).st_mode), stat.S_IMODE(os.stat(path).st_mode))


def _map(path: str, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # the mapping keeps the memory alive after the file is gone


class SharedMemoryAllReduce:
    """A shared mapping of one slot per rank, and the all-reduce through it. A collective to create:
    every rank of the default group constructs it at the same point, all on one machine."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        hosts = [None] * self.world_size
        dist.all_gather_object(hosts, socket.gethostname())
        if len(set(hosts)) != 1:
            raise ValueError(f"shared memory needs every rank on one machine; the ranks run on {sorted(set(hosts))}")
        self.capacity = -(-capacity // ALIGN) * ALIGN
        size = self.capacity * self.world_size
        created = [_create_owner_only(size) if self.rank == 0 else None]
        dist.broadcast_object_list(created)
        (path, self.modes) = created[0]
        self._mapping = _map(path, size)
        dist.barrier()  # every rank has mapped it: the name can go
        if self.rank == 0:
            os.unlink(path)
            os.rmdir(os.path.dirname(path))
        self.path = path  # where it was; it no longer exists
        self._memory = torch.frombuffer(self._mapping, dtype=torch.uint8)

    def _slot(self, rank: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
        start = rank * self.capacity
        return self._memory[start:start + numel * dtype.itemsize].view(dtype)

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """dist.all_reduce's contract (in place, returns the tensor), through the shared slots."""
        if op not in OUT_OF_PLACE:
            raise ValueError(f"op must be one of dist.ReduceOp.SUM, PRODUCT, MAX, MIN, got {op!r}")
        if self.world_size == 1:
            return tensor
        host = tensor if tensor.device.type == "cpu" else tensor.cpu()  # the mapping is host memory
        flat = host.view(-1) if host.is_contiguous() else host.reshape(-1).clone()
        per_segment = self.capacity // flat.element_size()
        for start in range(0, flat.numel(), per_segment):
            self._all_reduce_segment(flat[start:start + per_segment], OUT_OF_PLACE[op])
        if flat.data_ptr() != tensor.data_ptr():
            tensor.copy_(flat.view_as(tensor))
        return tensor

    def _all_reduce_segment(self, flat: torch.Tensor, reduce) -> None:
        n, me = self.world_size, self.rank
        slots = [self._slot(r, flat.dtype, flat.numel()).tensor_split(n) for r in range(n)]
        mine = flat.tensor_split(n)
        dist.barrier()  # nobody still reads the slots from the previous call
        for c in range(n):
            if c != me:
                slots[me][c].copy_(mine[c])
        dist.barrier()  # every slot published
        others = [r for r in range(n) if r != me]
        if others:
            reduce(mine[me], slots[others[0]][me], out=slots[me][me])
        for r in others[1:]:
            reduce(slots[me][me], slots[r][me], out=slots[me][me])
        dist.barrier()  # every chunk reduced
        for c in range(n):
            mine[c].copy_(slots[c][c])

    def close(self) -> None:
        """Unmap (every tensor viewing the mapping must be gone first)."""
        del self._memory
        self._mapping.close()


# -- measuring: the transports side by side, and the machine's limit (a rank function for dl.launch) ----

TRANSPORTS = ("gloo", "ring", "shared_memory", "memcpy")


def time_transports(ctx, sizes: list[int], transports: tuple[str, ...] = TRANSPORTS, repeats: int = 5) -> list[dict]:
    """Seconds per float32 size in bytes: gloo's dist.all_reduce, the hand-written ring over gloo, the
    shared-memory all-reduce, and one thread copying the same bytes once (memcpy, the limit any
    transport through memory works against). The slowest rank's median of `repeats`, each call started
    together after a barrier, the transports taking turns call by call."""
    from .collectives import ring_all_reduce

    unknown = set(transports) - set(TRANSPORTS)
    if unknown:
        raise ValueError(f"transports must be among {TRANSPORTS}, got {sorted(unknown)}")
    shm = SharedMemoryAllReduce(capacity=max(sizes)) if "shared_memory" in transports else None
    threads = torch.get_num_threads()
    rows = []
    for size in sizes:
        tensor = torch.ones(max(1, size // 4), device=ctx.device)
        copy = torch.empty_like(tensor)
        calls = {"gloo": partial(dist.all_reduce, tensor), "ring": partial(ring_all_reduce, tensor),
                 "shared_memory": shm and partial(shm.all_reduce, tensor), "memcpy": partial(copy.copy_, tensor)}
        times: dict[str, list[float]] = {t: [] for t in transports}
        for _ in range(repeats):
            for transport in transports:
                dist.barrier()
                torch.set_num_threads(1 if transport == "memcpy" else threads)
                start = time.perf_counter()
                calls[transport]()
                times[transport].append(time.perf_counter() - start)
        torch.set_num_threads(threads)
        medians = torch.tensor([sorted(times[t])[repeats // 2] for t in transports], dtype=torch.float64)
        dist.all_reduce(medians, op=dist.ReduceOp.MAX)
        rows += [{"algorithm": t, "bytes": tensor.numel() * 4, "world_size": ctx.world_size, "seconds": s,
                  "calls": repeats} for t, s in zip(transports, medians.tolist())]
    if shm is not None:
        shm.close()
    return rows
