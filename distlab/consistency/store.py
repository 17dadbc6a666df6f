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
- quorum:   no primary; every rank is a replica and a client (Dynamo-style, N = world size). A write asks
            R replicas for the key's version, takes (highest counter + 1, rank) and completes once W
            replicas stored it; a read asks R replicas, takes the newest reply and writes it back until W
            replicas hold it (read repair, as in Attiya, Bar-Noy & Dolev 1995). With R + W > N every read
            quorum meets every write quorum, and the store is linearizable; with R + W <= N it is not.

Faults (distlab/consistency/faults.py) act on these same messages: a message may be lost, delayed, or cut
by a partition, and a replica may pause. An operation that gets no quorum, or no reply in `timeout`, raises
Unavailable: "failed" when it surely did not happen, "unknown" when a replica may already hold it.

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

MODES = ("strong", "weak", "eventual", "quorum")
PRIMARY = 0
UNAVAILABLE = "unavailable"  # the reply of a primary that could not replicate a write
INITIAL = (0, -1)  # the version of a key never written (its value is None)
POLL_MS = 20  # how often a waiting thread looks at its stop flag


# -- the wire: JSON [kind, payload], checked field by field; versions travel as lists --------------------

class Unavailable(RuntimeError):
    """An operation the store could not complete. `outcome`: "failed" (it did not happen) or "unknown"."""

    def __init__(self, message: str, outcome: str = "unknown"):
        super().__init__(message)
        self.outcome = outcome


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
    """The answer to a request of `kind`, tuples restored; Malformed, or Unavailable if the replica said so."""
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError):
        raise Malformed(f"a reply to '{kind}' is not JSON") from None
    if answer == UNAVAILABLE:
        raise Unavailable(f"the replica could not complete the '{kind}'")
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
    outcome: str = "ok"  # "ok"; "failed": it did not happen (refused, or no quorum before any replica took it);
    # "unknown": it timed out after it may have reached a replica (may or may not have happened)


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


def _sender(identity: bytes, default: int) -> int:
    """The rank a store's socket names in its identity ("<rank>.<n>"); `default` for a stranger's socket."""
    rank = identity.partition(b".")[0]
    return int(rank) if rank.isdigit() else default


class Network:
    """Messages between ranks over ZeroMQ, counted by kind.

    Each rank binds a ROUTER socket (its server) in a private folder (mkdtemp makes it 0700). Sockets are
    not thread-safe, so every thread that sends gets its own DEALER socket per peer, and a reply computed on
    another thread is handed to the serving thread (`answer_later`), which sends it.
    """

    def __init__(self, rank: int, timeout: float, faults=None):
        self.rank, self.timeout, self.faults = rank, timeout, faults
        self.context = zmq.Context()
        self.server = self.context.socket(zmq.ROUTER)
        self.server.setsockopt(zmq.LINGER, 0)
        self.folder = tempfile.mkdtemp(prefix="distlab-store-")
        self.server.bind(f"ipc://{self.folder}/rank{rank}")
        self.endpoints: list[str] = []
        self.sent: Counter = Counter()
        self.lost: Counter = Counter()  # message kind -> lost to a fault
        self._opened = 0
        self._later: queue.Queue = queue.Queue()  # one-way messages a fault delays: (due, dst, frame)
        self.refused: Counter = Counter()  # reason -> frames refused
        self._count_lock = threading.Lock()
        self._local = threading.local()
        self._answers: queue.Queue = queue.Queue()  # (identity, answer) from other threads, for the server
        self._wake_lock = threading.Lock()
        self._wake_in, self._wake_out = self.context.socket(zmq.PAIR), self.context.socket(zmq.PAIR)
        self._wake_in.bind(f"inproc://wake-{id(self)}")
        self._wake_out.connect(f"inproc://wake-{id(self)}")
        self._poller = zmq.Poller()
        self._poller.register(self.server, zmq.POLLIN)
        self._poller.register(self._wake_in, zmq.POLLIN)

    def connect(self) -> None:
        """Learn every rank's address through the gloo group."""
        endpoints = [None] * dist.get_world_size()
        dist.all_gather_object(endpoints, self.server.getsockopt_string(zmq.LAST_ENDPOINT))
        self.endpoints = endpoints

    def _count(self, counter: Counter, kind: str) -> None:
        with self._count_lock:
            counter[kind] += 1

    def _socket(self, dst: int) -> zmq.Socket:
        sockets = self._local.__dict__.setdefault("sockets", {})
        if dst not in sockets:
            with self._count_lock:
                self._opened += 1
                identity = f"{self.rank}.{self._opened}".encode()  # the server reads the sender's rank here
            sockets[dst] = self.context.socket(zmq.DEALER)
            sockets[dst].setsockopt(zmq.LINGER, 0)
            sockets[dst].setsockopt(zmq.IDENTITY, identity)
            sockets[dst].setsockopt(zmq.SNDTIMEO, int(self.timeout * 1000))  # a full queue raises zmq.Again
            sockets[dst].connect(self.endpoints[dst])
        return sockets[dst]

    def _forget(self, dst: int) -> None:
        """Close this thread's socket to dst, so that a reply arriving late is never taken for the reply to the
        next request (a request still queued in it leaves first: the socket lingers up to `timeout`)."""
        sock = self._local.__dict__.get("sockets", {}).pop(dst, None)
        if sock is not None:
            sock.close(linger=int(self.timeout * 1000))

    def _fate(self, dst: int, kind: str) -> float | None:
        """What a fault does to this message: None (lost) or seconds of delay (0 on a perfect network)."""
        fate = 0.0 if self.faults is None else self.faults.fate(self.rank, dst)
        self._count(self.sent, kind)
        if fate is None:
            self._count(self.lost, kind)
        return fate

    def send(self, dst: int, kind: str, payload) -> None:
        """A one-way message (a delayed one leaves later, from the delaying thread: messages overtake)."""
        frame, fate = encode([kind, payload]), self._fate(dst, kind)
        if fate is None:
            return
        if fate > 0:
            self._later.put((time.time() + fate, dst, frame))
        else:
            self._socket(dst).send(frame)

    def send_delayed(self, stop: threading.Event) -> None:
        """The delaying thread: send each delayed one-way message when it is due."""
        waiting = []
        while not stop.is_set():
            try:
                waiting.append(self._later.get(timeout=POLL_MS / 1000))
            except queue.Empty:
                pass
            waiting.sort(key=lambda item: item[0])
            while waiting and waiting[0][0] <= time.time():
                _, dst, frame = waiting.pop(0)
                self._socket(dst).send(frame)

    def request(self, dst: int, kind: str, payload) -> None:
        """The request half of a call: a delayed request waits here, in the caller's thread."""
        frame, fate = encode([kind, payload]), self._fate(dst, kind)
        if fate:
            time.sleep(fate)
        if fate is not None:
            self._socket(dst).send(frame)

    def call(self, dst: int, kind: str, payload):
        """A request and its reply, waiting at most `timeout` seconds."""
        return self.gather([dst], kind, payload, need=1)[dst]

    def gather(self, dsts: list[int], kind: str, payload, need: int) -> dict:
        """Send one request to each of `dsts`; return {rank: reply} once `need` replied, or raise TimeoutError
        after `timeout` seconds. Sockets that have not replied are forgotten (their replies would come late)."""
        deadline = time.monotonic() + self.timeout
        for dst in dsts:
            self.request(dst, kind, payload)
        poller, replies = zmq.Poller(), {}
        sockets = {self._socket(dst): dst for dst in dsts}
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        try:
            while len(replies) < need and (left := deadline - time.monotonic()) > 0:
                for sock, _ in poller.poll(left * 1000):
                    replies[sockets[sock]] = sock.recv()
        finally:
            for dst in set(dsts) - set(replies):
                self._forget(dst)
        if len(replies) < need:
            raise TimeoutError(f"rank {self.rank}: {len(replies)} of {need} replies to '{kind}' within "
                               f"{self.timeout}s")
        return {dst: decode_reply(kind, raw) for dst, raw in replies.items()}

    def receive(self) -> tuple | None:
        """(sender identity, kind, payload) of the next request, or None after POLL_MS or a refused frame."""
        pause = self.faults.pause_left(self.rank) if self.faults else 0.0
        if pause > 0:  # paused: requests wait in the socket, unanswered
            time.sleep(min(pause, POLL_MS / 1000))
            return None
        ready = dict(self._poller.poll(POLL_MS))
        if self._wake_in in ready:
            self._send_answers()
        if self.server not in ready:
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
        """Answer the sender; a partition or loss applies to replies too (a delay does not: the request's did)."""
        frame = encode(answer)
        if self._fate(_sender(identity, self.rank), "reply") is not None:
            self.server.send_multipart([identity, frame])

    def answer_later(self, identity: bytes, answer) -> None:
        """From any thread: have the serving thread send this reply (it wakes at once)."""
        self._answers.put((identity, answer))
        with self._wake_lock:
            self._wake_out.send(b"")

    def _send_answers(self) -> None:
        while True:
            try:
                self._wake_in.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        while not self._answers.empty():
            self.reply(*self._answers.get())

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
                 gossip_interval: float = 0.02, timeout: float = 5.0, seed: int = 0, quorum: tuple = (2, 2),
                 faults=None, quorum_read=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not all(1 <= q <= world_size for q in quorum):
            raise ValueError(f"quorum (R, W) must each be between 1 and the world size {world_size}, got {quorum!r}")
        self.rank, self.world_size, self.mode = rank, world_size, mode
        self.propagation_delay, self.gossip_interval = propagation_delay, gossip_interval
        self.r, self.w = quorum
        self.quorum_read = quorum_read or read_repair  # how a quorum read decides (the lab replaces it)
        self.replica = Replica()
        self.net = Network(rank, timeout, faults)
        self.net.connect()
        self._rng = random.Random(seed * 1000 + rank)
        self._order = threading.Lock()  # the primary numbers and applies one write at a time
        self._counter = 0
        self._outbox: queue.Queue = queue.Queue()  # weak mode: (due time, key, value, version)
        self._forwarded: queue.Queue = queue.Queue()  # on the primary: (identity, (key, value)) from backups
        self._stop = threading.Event()
        workers = [self._serve, self._send_delayed]
        if mode in ("strong", "weak") and rank == PRIMARY:
            workers.append(self._apply_forwarded_writes)
        if mode == "weak" and rank == PRIMARY:
            workers.append(self._propagate)
        if mode == "eventual" and world_size > 1:
            workers.append(self._gossip)
        self._threads = [threading.Thread(target=w, daemon=True, name=f"store {w.__name__}") for w in workers]
        for thread in self._threads:
            thread.start()

    # -- the client -----------------------------------------------------------------------------
    def read(self, key: str) -> tuple:
        """(value, version): from the primary in strong mode, from R replicas in quorum mode, else local."""
        if self.mode == "quorum":
            return self.quorum_read(self, key)
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
        if self.mode == "quorum":
            return self._quorum_write(key, value)
        if self.rank != PRIMARY:
            return self.net.call(PRIMARY, "write", (key, value))
        return self._primary_write(key, value)

    # -- quorums: R replicas asked, W replicas storing (this rank is always one of them) -------------
    def ask(self, key: str) -> dict[int, tuple]:
        """{rank: (value, version)} from R replicas, this one included; Unavailable("failed") if fewer answer."""
        replies = {self.rank: self.replica.get(key)}
        if self.r > 1:
            try:
                replies.update(self.net.gather(self._peers(), "read", key, need=self.r - 1))
            except TimeoutError as error:
                raise Unavailable(f"no read quorum (R = {self.r}): {error}", "failed") from None
        return replies

    def store_on(self, key: str, value, version: tuple, holders=()) -> None:
        """Make W replicas hold (value, version): this one and peers not in `holders` (replicas known to hold
        it already count towards W); the others get it too, without waiting. Unavailable("unknown") if fewer
        than W acknowledge in time: some replicas may hold it already."""
        self.replica.merge(key, value, version)
        have = len(set(holders) | {self.rank})
        others = [r for r in self._peers() if r not in holders]
        try:
            self.net.gather(others, "replicate", (key, value, version), need=max(0, self.w - have))
        except TimeoutError as error:
            raise Unavailable(f"no write quorum (W = {self.w}): {error}", "unknown") from None

    def _quorum_write(self, key: str, value) -> tuple:
        newest = max(version for _, version in self.ask(key).values())
        version = (newest[0] + 1, self.rank)
        self.store_on(key, value, version)
        return version

    # -- the replica's side ---------------------------------------------------------------------
    def _primary_write(self, key: str, value) -> tuple:
        with self._order:
            self._counter += 1
            version = (self._counter, PRIMARY)
            self.replica.merge(key, value, version)
            if self.mode == "strong":
                try:
                    self.net.gather(self._peers(), "replicate", (key, value, version), need=self.world_size - 1)
                except TimeoutError as error:
                    raise Unavailable(f"a backup did not acknowledge: {error}", "unknown") from None
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

    def _answer(self, kind: str, payload):
        """`_handle`'s answer, UNAVAILABLE when the store could not do it; a request that fails otherwise is
        reported and gets no answer (one bad request must not silence the replica)."""
        try:
            return self._handle(kind, payload)
        except Unavailable:
            return UNAVAILABLE
        except Exception as error:
            print(f"distlab store, rank {self.rank}: a '{kind}' request failed: {error!r}", file=sys.stderr,
                  flush=True)
            return None

    def _serve(self) -> None:
        """Answer requests until stopped. A backup's write goes to `_apply_forwarded_writes`: a strong write
        waits for every backup (up to `timeout` behind a partition), and the reads meanwhile must not wait."""
        while not self._stop.is_set():
            message = self.net.receive()
            if message is None:
                continue
            identity, kind, payload = message
            if kind == "write":
                self._forwarded.put((identity, payload))
            elif (answer := self._answer(kind, payload)) is not None:
                self.net.reply(identity, answer)

    def _apply_forwarded_writes(self) -> None:
        """On the primary: the backups' writes, in order, off the serving thread."""
        while not self._stop.is_set():
            try:
                identity, payload = self._forwarded.get(timeout=POLL_MS / 1000)
            except queue.Empty:
                continue
            if (answer := self._answer("write", payload)) is not None:
                self.net.answer_later(identity, answer)

    def _propagate(self) -> None:
        """Weak mode, on the primary: send each write to the backups once its delay has passed."""
        while not self._stop.is_set():
            try:
                due, key, value, version = self._outbox.get(timeout=POLL_MS / 1000)
            except queue.Empty:
                continue
            time.sleep(max(0.0, due - time.time()) + self.paused())
            for backup in self._peers():
                self.net.send(backup, "update", (key, value, version))

    def _gossip(self) -> None:
        """Eventual mode: every interval, push the whole replica to one random peer."""
        while not self._stop.wait(self.gossip_interval + self.paused()):
            peer = self._rng.choice(self._peers())
            self.net.send(peer, "gossip", self.replica.snapshot())

    def _send_delayed(self) -> None:
        self.net.send_delayed(self._stop)

    def paused(self) -> float:
        """Seconds this replica stays paused by a fault (0 when running)."""
        return self.net.faults.pause_left(self.rank) if self.net.faults else 0.0

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


def read_repair(store: Store, key: str) -> tuple:
    """The quorum read: the newest of R replies, written back until W replicas hold it, so that no later read
    can return anything older (without the write-back, a write that reached one replica could be seen and
    then unseen: not linearizable)."""
    replies = store.ask(key)
    value, version = max(replies.values(), key=lambda reply: reply[1])
    store.store_on(key, value, version, holders=[r for r, (_, v) in replies.items() if v == version])
    return value, version


def operate(store: Store, key: str, value) -> Op:
    """One timed operation: a write when value is given, a read otherwise. One the store could not complete
    is recorded with its outcome ("failed" or "unknown") and no version."""
    time.sleep(store.paused())  # a paused process issues nothing
    kind, invoke = ("read" if value is None else "write"), time.time()
    try:
        if kind == "read":
            value, version = store.read(key)
        else:
            version = store.write(key, value)
    except Unavailable as error:
        return Op(kind, store.rank, key, value, INITIAL, invoke, time.time(), error.outcome)
    except TimeoutError:  # a call to the primary: it may have applied the write, and a read returned nothing
        outcome = "unknown" if kind == "write" else "failed"
        return Op(kind, store.rank, key, value, INITIAL, invoke, time.time(), outcome)
    return Op(kind, store.rank, key, value, version, invoke, time.time())


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
                 settle_timeout: float = 10.0, timeout: float = 5.0, seed: int = 0, quorum: tuple = (2, 2),
                 schedule=None, duration: float | None = None, quorum_read=None) -> dict:
    """Rank function: `ops` random reads and writes on `keys` keys, then wait until the replicas agree.

    Each write stores a value no other write stores ("r<rank>.<i>"), so a read's value names its write.
    Between operations a rank thinks for a random 0..2*think seconds, so operations of ranks interleave.
    With a fault `schedule` (distlab/consistency/faults.py: a Schedule, or a NetworkControl for faults ordered
    live), its clock starts when the operations start;
    `duration` (seconds) stops the operations then, whatever `ops` allows, so a fault covers a known share.
    """
    if not 0 <= write_fraction <= 1:
        raise ValueError(f"write_fraction must be between 0 and 1, got {write_fraction!r}")
    starts = [None] * ctx.world_size
    dist.all_gather_object(starts, time.time() + 0.05)  # one start for all: the schedule's time zero
    t0 = starts[0]
    faults = None if schedule is None else schedule.faults(ctx.rank, t0)
    store = Store(ctx.rank, ctx.world_size, mode, propagation_delay, gossip_interval, timeout, seed, quorum, faults,
                  quorum_read)
    rng = random.Random(seed * 1000 + 500 + ctx.rank)
    record = []
    try:
        dist.barrier()
        time.sleep(max(0.0, t0 - time.time()))
        for i in range(ops):
            if duration is not None and time.time() > t0 + duration:
                break
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
            "messages": dict(store.net.sent), "lost": dict(store.net.lost), "converged": converged, "t0": t0}
