"""A key-value store replicated over the ranks, in three consistency modes, and a workload that records its history.

Every rank holds a replica (a dict key -> (value, version)). Rank 0 is the primary.

- strong:   reads and writes go to the primary, which applies a write, copies it to every backup and
            waits for their acks before answering (primary-backup replication). One copy decides every
            answer, so the store is linearizable (Herlihy & Wing 1990).
- weak:     writes go to the primary, which answers at once and sends the write to the backups
            `propagation_delay` seconds later; reads come from the local replica, which may be stale.
- eventual: writes apply to the local replica, stamped (time, rank); reads are local; every
            `gossip_interval` each rank pushes its whole replica to a random peer (anti-entropy), and a
            replica keeps, per key, the value with the larger stamp (last writer wins; Demers et al. 1987).

Versions are tuples compared in order: (counter, 0) numbered by the primary, or (timestamp, rank).
The workload records every operation (rank, key, value, version, invoke and complete times) and every
version each replica applied; distlab/consistency/checker.py checks that record. All ranks run on one machine
here, so their time.time() clocks are the same clock and the times of different ranks compare.

Why ZeroMQ and not torch.distributed send/recv: a store is request/response between any two ranks at
any moment, while a rank also serves its peers. dist.recv must name the sender and the tensor size in
advance and blocks the thread; pyzmq gives each rank a ROUTER socket that answers whoever asks, with
messages of any (pickled) shape and a timeout on every wait. Sockets bind to 127.0.0.1 only; their
addresses are exchanged once through the gloo group (dist.all_gather_object). Pickle is safe here
only because every peer is one of our own ranks.
"""

from __future__ import annotations

import pickle
import queue
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch.distributed as dist
import zmq

MODES = ("strong", "weak", "eventual")
PRIMARY = 0
INITIAL = (0, -1)  # the version of a key never written (its value is None)
POLL_MS = 20  # how often a waiting thread looks at its stop flag


@dataclass(frozen=True)
class Op:
    """One operation as a client saw it: invoked at `invoke`, answered at `complete` (seconds, time.time())."""

    kind: str  # "read" or "write"
    rank: int
    key: str
    value: object
    version: tuple
    invoke: float
    complete: float


@dataclass
class History:
    """What a workload recorded on all ranks: operations, final replicas, applied versions, messages sent."""

    mode: str
    ops: list[Op]
    finals: list[dict]  # per rank: key -> (value, version) when the ranks stopped
    applied: list[list[tuple]]  # per rank: (time, key, version) each time the replica took a newer version
    messages: list[dict]  # per rank: message kind -> count sent

    @classmethod
    def from_results(cls, mode: str, results: list[dict]) -> History:
        ops = sorted((op for r in results for op in r["ops"]), key=lambda op: op.invoke)
        return cls(mode, ops, [r["final"] for r in results], [r["applied"] for r in results],
                   [r["messages"] for r in results])


class Network:
    """Messages between ranks over ZeroMQ, counted by kind.

    Each rank binds a ROUTER socket (its server). Sockets are not thread-safe, so every thread that
    sends gets its own DEALER socket per peer.
    """

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self.context = zmq.Context()
        self.server = self.context.socket(zmq.ROUTER)
        self.server.setsockopt(zmq.LINGER, 0)
        self.server.bind("tcp://127.0.0.1:*")
        self.endpoints: list[str] = []
        self.sent: Counter = Counter()
        self._count_lock = threading.Lock()
        self._local = threading.local()

    def connect(self) -> None:
        """Learn every rank's address through the gloo group."""
        endpoints = [None] * dist.get_world_size()
        dist.all_gather_object(endpoints, self.server.getsockopt_string(zmq.LAST_ENDPOINT))
        self.endpoints = endpoints

    def _count(self, kind: str) -> None:
        with self._count_lock:
            self.sent[kind] += 1

    def _socket(self, dst: int) -> zmq.Socket:
        sockets = self._local.__dict__.setdefault("sockets", {})
        if dst not in sockets:
            sockets[dst] = self.context.socket(zmq.DEALER)
            sockets[dst].setsockopt(zmq.LINGER, 0)
            sockets[dst].setsockopt(zmq.SNDTIMEO, int(self.timeout * 1000))  # a full queue raises zmq.Again
            sockets[dst].connect(self.endpoints[dst])
        return sockets[dst]

    def send(self, dst: int, kind: str, payload) -> None:
        """A one-way message."""
        self._socket(dst).send(pickle.dumps((kind, payload)))
        self._count(kind)

    def call(self, dst: int, kind: str, payload):
        """A request and its reply, waiting at most `timeout` seconds."""
        sock = self._socket(dst)
        self.send(dst, kind, payload)
        if not sock.poll(self.timeout * 1000):
            raise TimeoutError(f"rank {self.rank}: no reply from rank {dst} to '{kind}' within {self.timeout}s")
        return pickle.loads(sock.recv())

    def receive(self) -> tuple | None:
        """(sender identity, kind, payload) of the next request, or None after POLL_MS."""
        if not self.server.poll(POLL_MS):
            return None
        identity, raw = self.server.recv_multipart()
        return (identity, *pickle.loads(raw))

    def reply(self, identity: bytes, answer) -> None:
        self.server.send_multipart([identity, pickle.dumps(answer)])
        self._count("reply")

    def close(self) -> None:
        self.context.destroy(linger=0)


class Replica:
    """One copy of the data. `merge` keeps the larger version (last writer wins) and logs when it changed."""

    def __init__(self):
        self.data: dict[str, tuple] = {}
        self.applied: list[tuple] = []
        self.lock = threading.Lock()

    def get(self, key: str) -> tuple:
        with self.lock:
            return self.data.get(key, (None, INITIAL))

    def merge(self, key: str, value, version: tuple) -> None:
        with self.lock:
            if version > self.data.get(key, (None, INITIAL))[1]:
                self.data[key] = (value, version)
                self.applied.append((time.time(), key, version))

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.data)


class Store:
    """This rank's replica and its client in one mode; `read` and `write` are the client's operations."""

    def __init__(self, rank: int, world_size: int, mode: str, propagation_delay: float = 0.02,
                 gossip_interval: float = 0.02, timeout: float = 5.0, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.rank, self.world_size, self.mode = rank, world_size, mode
        self.propagation_delay, self.gossip_interval = propagation_delay, gossip_interval
        self.replica = Replica()
        self.net = Network(rank, timeout)
        self.net.connect()
        self._rng = random.Random(seed * 1000 + rank)
        self._order = threading.Lock()  # the primary numbers and applies one write at a time
        self._counter = 0
        self._outbox: queue.Queue = queue.Queue()  # weak mode: (due time, key, value, version)
        self._stop = threading.Event()
        workers = [self._serve]
        if mode == "weak" and rank == PRIMARY:
            workers.append(self._propagate)
        if mode == "eventual" and world_size > 1:
            workers.append(self._gossip)
        self._threads = [threading.Thread(target=w, daemon=True, name=f"store {w.__name__}") for w in workers]
        for thread in self._threads:
            thread.start()

    # -- the client -----------------------------------------------------------------------------
    def read(self, key: str) -> tuple:
        """(value, version): from the primary in strong mode, from the local replica otherwise."""
        if self.mode == "strong" and self.rank != PRIMARY:
            return self.net.call(PRIMARY, "read", key)
        return self.replica.get(key)

    def write(self, key: str, value) -> tuple:
        """Store value under key; returns the version it got."""
        if self.mode == "eventual":
            version = (time.time(), self.rank)
            self.replica.merge(key, value, version)
            return version
        if self.rank != PRIMARY:
            return self.net.call(PRIMARY, "write", (key, value))
        return self._primary_write(key, value)

    # -- the replica's side ---------------------------------------------------------------------
    def _primary_write(self, key: str, value) -> tuple:
        with self._order:
            self._counter += 1
            version = (self._counter, PRIMARY)
            self.replica.merge(key, value, version)
            if self.mode == "strong":
                for backup in self._peers():
                    self.net.call(backup, "replicate", (key, value, version))
            else:
                self._outbox.put((time.time() + self.propagation_delay, key, value, version))
        return version

    def _handle(self, kind: str, payload):
        """Answer one message; None means no reply (a one-way message)."""
        if kind == "read":
            return self.replica.get(payload)
        if kind == "write":
            return self._primary_write(*payload)
        if kind == "replicate":
            self.replica.merge(*payload)
            return "ack"
        if kind == "update":
            self.replica.merge(*payload)
        elif kind == "gossip":
            for key, (value, version) in payload.items():
                self.replica.merge(key, value, version)
        return None

    def _serve(self) -> None:
        while not self._stop.is_set():
            message = self.net.receive()
            if message is not None:
                identity, kind, payload = message
                answer = self._handle(kind, payload)
                if answer is not None:
                    self.net.reply(identity, answer)

    def _propagate(self) -> None:
        """Weak mode, on the primary: send each write to the backups once its delay has passed."""
        while not self._stop.is_set():
            try:
                due, key, value, version = self._outbox.get(timeout=POLL_MS / 1000)
            except queue.Empty:
                continue
            time.sleep(max(0.0, due - time.time()))
            for backup in self._peers():
                self.net.send(backup, "update", (key, value, version))

    def _gossip(self) -> None:
        """Eventual mode: every interval, push the whole replica to one random peer."""
        while not self._stop.wait(self.gossip_interval):
            peer = self._rng.choice(self._peers())
            self.net.send(peer, "gossip", self.replica.snapshot())

    def _peers(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.rank]

    def stop(self) -> None:
        """Stop serving, propagating and gossiping."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def close(self) -> None:
        """Stop, then close the sockets (after every rank stopped sending: a barrier)."""
        self.stop()
        self.net.close()


def operate(store: Store, key: str, value) -> Op:
    """One timed operation: a write when value is given, a read otherwise."""
    invoke = time.time()
    if value is None:
        value, version = store.read(key)
        return Op("read", store.rank, key, value, version, invoke, time.time())
    version = store.write(key, value)
    return Op("write", store.rank, key, value, version, invoke, time.time())


def wait_until_replicas_agree(store: Store, timeout: float) -> bool:
    """After writes stop: compare every replica's contents through gloo until they match (or timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        everyone = [None] * store.world_size  # (replica, past its deadline) of every rank: all leave together
        dist.all_gather_object(everyone, (sorted(store.replica.snapshot().items()), time.monotonic() > deadline))
        agree = all(state == everyone[0][0] for state, _ in everyone)
        if agree or any(late for _, late in everyone):
            return agree
        time.sleep(store.gossip_interval / 2 if store.mode == "eventual" else store.propagation_delay / 4)


def run_workload(ctx, mode: str = "strong", ops: int = 100, keys: int = 4, write_fraction: float = 0.3,
                 think: float = 0.002, propagation_delay: float = 0.02, gossip_interval: float = 0.02,
                 settle_timeout: float = 10.0, timeout: float = 5.0, seed: int = 0) -> dict:
    """Rank function: `ops` random reads and writes on `keys` keys, then wait until the replicas agree.

    Each write stores a value no other write stores ("r<rank>.<i>"), so a read's value names its write.
    Between operations a rank thinks for a random 0..2*think seconds, so operations of ranks interleave.
    """
    if not 0 <= write_fraction <= 1:
        raise ValueError(f"write_fraction must be between 0 and 1, got {write_fraction!r}")
    store = Store(ctx.rank, ctx.world_size, mode, propagation_delay, gossip_interval, timeout, seed)
    rng = random.Random(seed * 1000 + 500 + ctx.rank)
    record = []
    try:
        dist.barrier()
        for i in range(ops):
            key = f"k{rng.randrange(keys)}"
            value = f"r{ctx.rank}.{i}" if rng.random() < write_fraction else None
            record.append(operate(store, key, value))
            time.sleep(rng.uniform(0, 2 * think))
        dist.barrier()  # writes have stopped everywhere
        converged = wait_until_replicas_agree(store, settle_timeout)
        store.stop()
        dist.barrier()  # nobody sends any more
    finally:
        store.close()
    return {"ops": record, "final": store.replica.snapshot(), "applied": store.replica.applied,
            "messages": dict(store.net.sent), "converged": converged}
