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
a timeout on every wait. Addresses are exchanged once through the gloo group (dist.all_gather_object).

On a shared server every other user is a stranger: each socket is an ipc:// (Unix) socket in a folder only
this user can open (mode 0700, removed on close), and messages are JSON, never pickle, so even a frame
from a process of our own user can only be refused: values must be JSON (str, numbers, bool, None, lists,
dicts with str keys). A malformed frame is refused and logged once per reason; the serving thread goes on.
"""

from __future__ import annotations

import json
import queue
import random
import shutil
import sys
import tempfile
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


# -- the wire: JSON [kind, payload], checked field by field; versions travel as lists --------------------

class Malformed(ValueError):
    """A frame that is not one of the store's messages. str(error) is the reason, the same for each kind
    of fault, so each is logged once."""


def _fields(raw, count: int, what: str) -> list:
    if not (isinstance(raw, list) and len(raw) == count):
        raise Malformed(f"{what} is not a list of {count}")
    return raw


def _key(raw) -> str:
    if not isinstance(raw, str):
        raise Malformed("a key is not a string")
    return raw


def _version(raw) -> tuple:
    parts = _fields(raw, 2, "a version")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in parts):
        raise Malformed("a version is not two numbers")
    return tuple(parts)


def _write(raw) -> tuple:
    key, value = _fields(raw, 2, "a write")
    return _key(key), value


def _entry(raw) -> tuple:
    key, value, version = _fields(raw, 3, "an update")
    return _key(key), value, _version(version)


def _stored(raw) -> tuple:
    value, version = _fields(raw, 2, "a stored value")
    return value, _version(version)


def _replica(raw) -> dict:
    if not isinstance(raw, dict):
        raise Malformed("a gossiped replica is not an object")
    return {_key(key): _stored(entry) for key, entry in raw.items()}


def _ack(raw) -> str:
    if raw != "ack":
        raise Malformed("an acknowledgement is not 'ack'")
    return raw


REQUESTS = {"read": _key, "write": _write, "replicate": _entry, "update": _entry, "gossip": _replica}
REPLIES = {"read": _stored, "write": _version, "replicate": _ack}  # by the request's kind


def encode(message) -> bytes:
    """JSON bytes; a value JSON cannot hold is refused here, on the sender, with the reason."""
    try:
        return json.dumps(message).encode()
    except (TypeError, ValueError) as error:
        raise TypeError(f"the replicated store sends JSON: values must be str, numbers, bool, None, lists or "
                        f"dicts with str keys ({error})") from None


def decode_request(raw: bytes) -> tuple[str, object]:
    """(kind, payload) of a request, tuples restored, or Malformed."""
    try:
        kind, payload = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        raise Malformed("not a JSON [kind, payload] pair") from None
    if not isinstance(kind, str) or kind not in REQUESTS:
        raise Malformed("an unknown kind of request")
    return kind, REQUESTS[kind](payload)


def decode_reply(kind: str, raw: bytes):
    """The answer to a request of `kind`, tuples restored, or Malformed."""
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError):
        raise Malformed(f"a reply to '{kind}' is not JSON") from None
    return REPLIES[kind](answer)


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

    Each rank binds a ROUTER socket (its server) in a private folder (mkdtemp makes it 0700). Sockets are
    not thread-safe, so every thread that sends gets its own DEALER socket per peer.
    """

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self.context = zmq.Context()
        self.server = self.context.socket(zmq.ROUTER)
        self.server.setsockopt(zmq.LINGER, 0)
        self.folder = tempfile.mkdtemp(prefix="distlab-store-")
        self.server.bind(f"ipc://{self.folder}/rank{rank}")
        self.endpoints: list[str] = []
        self.sent: Counter = Counter()
        self.refused: Counter = Counter()  # reason -> frames refused
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
        self._socket(dst).send(encode([kind, payload]))
        self._count(kind)

    def call(self, dst: int, kind: str, payload):
        """A request and its reply, waiting at most `timeout` seconds."""
        sock = self._socket(dst)
        self.send(dst, kind, payload)
        if not sock.poll(self.timeout * 1000):
            raise TimeoutError(f"rank {self.rank}: no reply from rank {dst} to '{kind}' within {self.timeout}s")
        return decode_reply(kind, sock.recv())

    def receive(self) -> tuple | None:
        """(sender identity, kind, payload) of the next request, or None after POLL_MS or a refused frame."""
        if not self.server.poll(POLL_MS):
            return None
        frames = self.server.recv_multipart()
        try:
            if len(frames) != 2:
                raise Malformed("not one frame")
            return (frames[0], *decode_request(frames[1]))
        except Malformed as error:
            self.refuse(str(error))
            return None

    def refuse(self, reason: str) -> None:
        """Count a refused frame; say so on stderr the first time for each reason (a flood stays one line)."""
        self.refused[reason] += 1
        if self.refused[reason] == 1:
            print(f"distlab store, rank {self.rank}: refused a message ({reason}); "
                  "more like it are refused without a word", file=sys.stderr, flush=True)

    def reply(self, identity: bytes, answer) -> None:
        self.server.send_multipart([identity, encode(answer)])
        self._count("reply")

    def close(self) -> None:
        self.context.destroy(linger=0)
        shutil.rmtree(self.folder, ignore_errors=True)


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
        """Store value under key (a JSON value: it travels as JSON); returns the version it got."""
        encode(value)  # refuse what cannot travel here, not later in a gossiping thread
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
        """Answer requests until stopped. A request that fails is reported, never the end of serving."""
        while not self._stop.is_set():
            message = self.net.receive()
            if message is None:
                continue
            identity, kind, payload = message
            try:
                answer = self._handle(kind, payload)
                if answer is not None:
                    self.net.reply(identity, answer)
            except Exception as error:  # one bad request must not silence the replica
                print(f"distlab store, rank {self.rank}: a '{kind}' request failed: {error!r}", file=sys.stderr,
                      flush=True)

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
