"""All-reduce through shared memory: the ring's two phases without a wire, for ranks on one machine.

gloo moves a tensor between two local processes through loopback TCP: copied into a socket, through
the kernel, out again. Ranks on one machine can instead map the same memory, and a transfer becomes a
memcpy. NCCL does this between GPUs of one box (and NVLink beyond), MPI between local processes
(MPICH's and Open MPI's shared-memory transports); here it is written out:

    flags | rank 0: buffer 0, buffer 1 | rank 1: buffer 0, buffer 1 | ...     one mapping, `piece` bytes a buffer

The tensor goes through in pieces of `piece` bytes, small enough to stay in the processors' caches
between the phases (a whole 64 MB tensor would go to memory and back three times): 1 MB, or 4 MB
when the ranks outnumber the cores, where every wait may cost a context switch and fewer waits win. For each piece,
in buffer (piece number mod 2) of each rank:

1. publish:        rank r copies every chunk c != r of the piece into its buffer   (N-1)/N·P bytes
2. reduce-scatter: rank r sums chunk r of its own piece and of every other buffer,
                   into chunk r of its own buffer                                 (N-1) reads of P/N
3. all-gather:     rank r copies chunk c of buffer c into its piece, for every c            P bytes

Between the phases each rank waits for the others' flags: a counter per rank in the mapping, raised
after each phase. Stores become visible to other cores in program order on x86, so a rank that sees
a peer's flag raised also sees the data written before it; elsewhere the wait is the process group's
barrier instead. Two buffers a rank mean a rank may publish the next piece while a slower peer still
gathers this one. Each chunk is summed once, by one rank, so every rank ends with the same bits.

The mapping is owner-only (DESIGN.md, "On a shared server"): rank 0 creates a 0600 file in a fresh 0700
folder under /dev/shm (the temp folder if /dev/shm has no room), every local rank maps it, and rank 0
removes file and folder as soon as all have mapped it: nothing is left for another user to open, and
nothing stays behind after a crash.
"""

from __future__ import annotations

import mmap
import os
import platform
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
ALIGN = 64  # bytes: a cache line (one flag each, so that no two ranks' flags share one), enough for any view
PIECE = 1 << 20  # bytes: the piece and its chunks stay in each core's cache (L2) between phases
SHARED_CORES_PIECE = 4 << 20  # with more ranks than cores a phase's end costs a context switch: fewer, larger
ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")  # total store order
WAIT_TIMEOUT = 300.0  # seconds a rank waits for a peer's flag before it gives up
SPINS, NAP = 256, 20e-6  # ranks sharing cores: polls of a peer's flag before each further one sleeps NAP s


def shm_folder(size: int) -> str:
    """Where the mapping's file lives for the instant before it is removed: memory-backed /dev/shm if it
    has room (a container's is often 64 MB, and touching a mapping beyond it kills with SIGBUS)."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        free = os.statvfs("/dev/shm")
        if free.f_bavail * free.f_frsize >= size:
            return "/dev/shm"
    return tempfile.gettempdir()


def _create_owner_only(size: int) -> tuple[str, tuple[int, int]]:
    """A new file of `size` bytes, mode 0600, in a new folder of mode 0700, whatever the umask; returns its
    path and the (folder, file) modes as created."""
    folder = tempfile.mkdtemp(prefix="distlab-shm-", dir=shm_folder(size))  # 0700, a name nobody can guess
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
    """A shared mapping of flags and two buffers per rank, and the all-reduce through it. A collective to
    create: every rank of the default group constructs it at the same point, all on one machine."""

    def __init__(self, piece: int | None = None):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._shared_cores = self.world_size > len(os.sched_getaffinity(0))
        if piece is None:
            piece = SHARED_CORES_PIECE if self._shared_cores else PIECE
        hosts = [None] * self.world_size
        dist.all_gather_object(hosts, socket.gethostname())
        if len(set(hosts)) != 1:
            raise ValueError(f"shared memory needs every rank on one machine; the ranks run on {sorted(set(hosts))}")
        self.piece = -(-piece // (ALIGN * self.world_size)) * ALIGN * self.world_size  # chunks stay aligned
        flags = ALIGN * self.world_size
        size = flags + 2 * self.piece * self.world_size
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
        self._flags = [self._memory[r * ALIGN:(r + 1) * ALIGN].view(torch.int64)[:1] for r in range(self.world_size)]
        self._buffers = self._memory[flags:]
        self._pieces = 0  # pieces all-reduced so far, by every rank alike: the flags count from it
        self._views: dict[tuple, list[tuple[torch.Tensor, ...]]] = {}

    def _slots(self, which: int, dtype: torch.dtype, numel: int) -> list[tuple[torch.Tensor, ...]]:
        """Every rank's buffer `which`, as `numel` elements split in N chunks (views made once, then reused)."""
        key = (which, dtype, numel)
        if key not in self._views:
            starts = [(2 * rank + which) * self.piece for rank in range(self.world_size)]
            self._views[key] = [self._buffers[start:start + numel * dtype.itemsize].view(dtype)
                                .tensor_split(self.world_size) for start in starts]
        return self._views[key]

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """dist.all_reduce's contract (in place, returns the tensor), through the shared buffers."""
        if op not in OUT_OF_PLACE:
            raise ValueError(f"op must be one of dist.ReduceOp.SUM, PRODUCT, MAX, MIN, got {op!r}")
        if self.world_size == 1:
            return tensor
        host = tensor if tensor.device.type == "cpu" else tensor.cpu()  # the mapping is host memory
        flat = host.view(-1) if host.is_contiguous() else host.reshape(-1).clone()
        per_piece = self.piece // flat.element_size()
        for start in range(0, flat.numel(), per_piece):
            self._all_reduce_piece(flat[start:start + per_piece], OUT_OF_PLACE[op])
        if flat.data_ptr() != tensor.data_ptr():
            tensor.copy_(flat.view_as(tensor))
        return tensor

    def _all_reduce_piece(self, flat: torch.Tensor, reduce) -> None:
        n, me, k = self.world_size, self.rank, self._pieces
        slots = self._slots(k % 2, flat.dtype, flat.numel())
        mine = flat.tensor_split(n)
        for c in range(n):
            if c != me:
                slots[me][c].copy_(mine[c])
        self._raise_and_wait(2 * k + 1)  # every buffer published
        others = [r for r in range(n) if r != me]
        reduce(mine[me], slots[others[0]][me], out=slots[me][me])
        for r in others[1:]:
            reduce(slots[me][me], slots[r][me], out=slots[me][me])
        self._raise_and_wait(2 * k + 2)  # every chunk reduced
        for c in range(n):
            mine[c].copy_(slots[c][c])
        self._pieces += 1

    def _raise_and_wait(self, count: int) -> None:
        """Raise this rank's flag to `count` and wait until every other rank's has reached it."""
        if not ORDERED_STORES:
            dist.barrier()
            return
        self._flags[self.rank].fill_(count)
        deadline = time.monotonic() + WAIT_TIMEOUT
        for rank, flag in enumerate(self._flags):
            polls = 0
            while flag.item() < count:
                polls += 1
                if self._shared_cores and polls > SPINS:
                    time.sleep(NAP)  # the peer may be waiting for a core: give it ours
                elif polls % 64 == 0:
                    os.sched_yield()  # whatever else wants this core (the VM's, the kernel's) may run
                if polls % 1024 == 0 and time.monotonic() > deadline:
                    raise TimeoutError(f"rank {self.rank} waited {WAIT_TIMEOUT:g} s for rank {rank}'s "
                                       f"shared-memory flag to reach {count}; it is at {flag.item()}")

    def close(self) -> None:
        """Unmap (every tensor viewing the mapping must be gone first)."""
        del self._memory, self._flags, self._buffers, self._views
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
    shm = SharedMemoryAllReduce() if "shared_memory" in transports else None
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
