"""Publish/subscribe over ZeroMQ: ranks publish to topics and subscribe, decoupled by a broker.

The broker forwards from an XSUB socket (publishers connect) to an XPUB socket (subscribers connect),
in a thread of the launching process. What this gives, and what it does not:

- per-publisher FIFO: one publisher's messages reach a subscriber in the order they were published
  (one stream to the broker, one from it; the proxy forwards in order). No order across publishers.
- at-most-once: nothing is retried, so nothing is duplicated, but messages can be lost: published
  before the subscription reached the publisher (the "slow joiner"), or past a high-water mark when a
  subscriber cannot keep up. `handshake()` closes the first gap: every rank hears from every
  publisher before anyone publishes for real.
- no coupling: publish() returns at once, whoever listens or not; a collective waits for every rank.

On a shared server: the broker's two sockets are ipc:// (Unix) sockets in a folder only this user can open
(mode 0700, removed on close), and a message is a topic and a JSON [publisher, seq, sent_at, body], never a
pickle, so a body must be JSON (a tensor travels as tensor.tolist()). A subscriber refuses a malformed
frame, says so once per reason on stderr, and keeps listening.
"""

from __future__ import annotations

import json
import queue
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import zmq

HELLO = "_hello"  # the handshake's topic; every subscriber hears it, apart from its messages


class Malformed(ValueError):
    """A frame that is not a published message; str(error) is the reason, one per kind of fault."""


@dataclass
class Message:
    topic: str
    publisher: int
    seq: int  # 0, 1, 2, ... per publisher: gaps are losses, repeats would be duplicates
    sent_at: float
    received_at: float
    body: object


class Broker:
    """An XSUB/XPUB forwarder in a background thread, on ipc:// sockets in a private folder (mkdtemp: mode
    0700) that only this user can open; `with Broker() as b:` stops it and removes the folder."""

    def __init__(self):
        self._context = zmq.Context()
        self._frontend, self._backend = self._context.socket(zmq.XSUB), self._context.socket(zmq.XPUB)
        self.folder = tempfile.mkdtemp(prefix="distlab-broker-")
        self.publish_address, self.subscribe_address = f"ipc://{self.folder}/publish", f"ipc://{self.folder}/subscribe"
        self._frontend.bind(self.publish_address)
        self._backend.bind(self.subscribe_address)
        self._control = self._context.socket(zmq.PAIR)
        self._control.bind(f"inproc://control-{id(self)}")
        self._thread = threading.Thread(target=self._forward, daemon=True)
        self._thread.start()

    def _forward(self) -> None:
        control = self._context.socket(zmq.PAIR)
        control.connect(f"inproc://control-{id(self)}")
        zmq.proxy_steerable(self._frontend, self._backend, None, control)  # until "TERMINATE"
        control.close()

    def close(self) -> None:
        self._control.send(b"TERMINATE")
        self._thread.join(timeout=5)
        for sock in (self._control, self._frontend, self._backend):
            sock.close(linger=0)
        self._context.term()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Publisher:
    """A PUB socket connected to the broker; publish() never blocks (and never knows who listens)."""

    def __init__(self, address: str, name: int):
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.connect(address)
        self.name, self.seq = name, 0

    def publish(self, topic: str, body: object = None) -> int:
        """Send `body` on `topic`; returns its sequence number."""
        seq, self.seq = self.seq, self.seq + 1
        self._send(topic, seq, body)
        return seq

    def hello(self) -> None:
        self._send(HELLO, -1, None)

    def _send(self, topic: str, seq: int, body: object) -> None:
        self._socket.send_multipart([topic.encode(), encode(self.name, seq, time.time(), body)])

    def close(self) -> None:
        self._socket.close(linger=1000)


def encode(publisher: int, seq: int, sent_at: float, body: object) -> bytes:
    """A message's JSON frame; a body JSON cannot hold is refused here, on the publisher."""
    try:
        return json.dumps([publisher, seq, sent_at, body]).encode()
    except (TypeError, ValueError) as error:
        raise TypeError(f"body must be JSON (str, numbers, bool, None, lists, dicts with str keys; a tensor as "
                        f"tensor.tolist()): {error}") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def decode(frames: list[bytes]) -> tuple[str, int, int, float, object]:
    """(topic, publisher, seq, sent_at, body) of a received message, or Malformed."""
    if len(frames) != 2:
        raise Malformed("not a topic and one frame")
    try:
        topic, (publisher, seq, sent_at, body) = frames[0].decode(), json.loads(frames[1])
    except (ValueError, TypeError, RecursionError):
        raise Malformed("not a JSON [publisher, seq, sent_at, body]") from None
    if not (_is_int(publisher) and _is_int(seq) and isinstance(sent_at, (int, float))):
        raise Malformed("publisher, seq or sent_at is not a number")
    return topic, publisher, seq, sent_at, body


class Subscriber:
    """A SUB socket read by a background thread: messages of the topics (prefixes) wait in a queue."""

    def __init__(self, address: str, topics: list[str], receive_hwm: int = 1000):
        self.heard: set[int] = set()  # publishers whose hello arrived
        self.refused: dict[str, int] = {}  # reason -> malformed frames refused
        self._messages: queue.Queue[Message] = queue.Queue()
        self._stop = threading.Event()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._receive, args=(address, topics, receive_hwm, ready), daemon=True)
        self._thread.start()
        ready.wait(5)

    def _receive(self, address: str, topics: list[str], hwm: int, ready: threading.Event) -> None:
        sock = zmq.Context.instance().socket(zmq.SUB)  # a zmq socket stays in the thread that uses it
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.connect(address)
        for topic in [*topics, HELLO]:
            sock.setsockopt_string(zmq.SUBSCRIBE, topic)
        ready.set()
        while not self._stop.is_set():
            if sock.poll(20):
                self._take_in(sock.recv_multipart())
        sock.close(linger=0)

    def _take_in(self, frames: list[bytes]) -> None:
        """One received frame: a hello, a message for the queue, or refused."""
        try:
            topic, publisher, seq, sent_at, body = decode(frames)
        except Malformed as error:
            self._refuse(str(error))
            return
        if topic == HELLO:
            self.heard.add(publisher)
        else:
            self._messages.put(Message(topic, publisher, seq, sent_at, time.time(), body))

    def _refuse(self, reason: str) -> None:
        """Count a refused frame; say so on stderr the first time for each reason (a flood stays one line)."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        if self.refused[reason] == 1:
            print(f"distlab pub/sub: refused a message ({reason}); more like it are refused without a word",
                  file=sys.stderr, flush=True)

    def take(self, count: int, timeout: float = 10.0) -> list[Message]:
        """Up to `count` messages, waiting at most `timeout` seconds in all (fewer if some were lost)."""
        deadline, got = time.monotonic() + timeout, []
        while len(got) < count and (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self._messages.get(timeout=left))
            except queue.Empty:
                break
        return got

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def handshake(publisher: Publisher, subscriber: Subscriber, publishers: int, timeout: float = 30.0) -> int:
    """Against the slow joiner: say hello until every rank has heard all `publishers`, agreed through an
    all-reduce of the process group. Returns the hellos this rank sent."""
    deadline, sent = time.monotonic() + timeout, 0
    while True:
        publisher.hello()
        sent += 1
        time.sleep(0.01)
        waiting = torch.tensor([len(subscriber.heard) < publishers, time.monotonic() > deadline], dtype=torch.int)
        dist.all_reduce(waiting, op=dist.ReduceOp.MAX)  # every rank leaves the loop at the same round
        if not waiting[0]:
            return sent
        if waiting[1]:
            raise TimeoutError(f"pub/sub handshake: rank heard {len(subscriber.heard)} of {publishers} publishers")


# -- rank functions for dl.launch: what the notebook shows and the tests check -------------------------

def exchange(ctx, publish_address: str, subscribe_address: str, messages: int = 100,
             greet: bool = True) -> list[tuple]:
    """Rank r publishes `messages` on "metrics" and on "grad/r"; it subscribes to "metrics" and to its
    left neighbour's "grad/...". Returns what arrived: (topic, publisher, seq, latency in seconds)."""
    n = ctx.world_size
    subscriber = Subscriber(subscribe_address, ["metrics", f"grad/{(ctx.rank - 1) % n}"])
    publisher = Publisher(publish_address, ctx.rank)
    if greet:
        handshake(publisher, subscriber, publishers=n)
    for i in range(messages):
        publisher.publish("metrics", {"rank": ctx.rank, "step": i})
        publisher.publish(f"grad/{ctx.rank}", i)
    got = subscriber.take((n + 1) * messages, timeout=5 if greet else 1)
    publisher.close()
    subscriber.close()
    return [(m.topic, m.publisher, m.seq, m.received_at - m.sent_at) for m in got]


def coupling(ctx, publish_address: str, subscribe_address: str, delay: float = 0.5, late_rank: int = 0) -> dict:
    """One rank arrives `delay` seconds late: how long do the others spend in publish() and in a
    synchronous all_reduce? Also the latency of a small all_reduce on time."""
    subscriber = Subscriber(subscribe_address, ["status"])
    publisher = Publisher(publish_address, ctx.rank)
    handshake(publisher, subscriber, publishers=ctx.world_size)
    if ctx.rank == late_rank:
        time.sleep(delay)
    start = time.perf_counter()
    publisher.publish("status", "step done")
    publish_seconds = time.perf_counter() - start
    start = time.perf_counter()
    dist.all_reduce(torch.ones(1))
    all_reduce_seconds = time.perf_counter() - start
    on_time = []
    for _ in range(20):
        start = time.perf_counter()
        dist.all_reduce(torch.ones(1))
        on_time.append(time.perf_counter() - start)
    subscriber.take(ctx.world_size, timeout=2)
    publisher.close()
    subscriber.close()
    return {"publish_seconds": publish_seconds, "all_reduce_seconds": all_reduce_seconds,
            "all_reduce_latency": sorted(on_time)[10]}
