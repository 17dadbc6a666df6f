"""Publish/subscribe over ZeroMQ: ranks publish to topics and subscribe, decoupled by a broker.

The broker forwards from an XSUB socket (publishers connect) to an XPUB socket (subscribers connect),
in a thread of the launching process. What this gives, and what it does not:

- per-publisher FIFO: one publisher's messages reach a subscriber in the order they were published
  (one TCP stream to the broker, one from it; the proxy forwards in order). No order across publishers.
- at-most-once: nothing is retried, so nothing is duplicated, but messages can be lost: published
  before the subscription reached the publisher (the "slow joiner"), or past a high-water mark when a
  subscriber cannot keep up. `handshake()` closes the first gap: every rank hears from every
  publisher before anyone publishes for real.
- no coupling: publish() returns at once, whoever listens or not; a collective waits for every rank.
"""

from __future__ import annotations

import pickle
import queue
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import zmq

HELLO = "_hello"  # the handshake's topic; every subscriber hears it, apart from its messages


@dataclass
class Message:
    topic: str
    publisher: int
    seq: int  # 0, 1, 2, ... per publisher: gaps are losses, repeats would be duplicates
    sent_at: float
    received_at: float
    body: object


class Broker:
    """An XSUB/XPUB forwarder on 127.0.0.1 in a background thread; `with Broker() as b:` stops it."""

    def __init__(self, host: str = "127.0.0.1"):
        self._context = zmq.Context()
        self._frontend, self._backend = self._context.socket(zmq.XSUB), self._context.socket(zmq.XPUB)
        self._frontend.bind(f"tcp://{host}:0")  # port 0: a free port, picked by the OS
        self._backend.bind(f"tcp://{host}:0")
        self.publish_address = self._frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.subscribe_address = self._backend.getsockopt_string(zmq.LAST_ENDPOINT)
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
        self._socket.send_multipart([topic.encode(), pickle.dumps((self.name, seq, time.time(), body))])

    def close(self) -> None:
        self._socket.close(linger=1000)


class Subscriber:
    """A SUB socket read by a background thread: messages of the topics (prefixes) wait in a queue."""

    def __init__(self, address: str, topics: list[str], receive_hwm: int = 1000):
        self.heard: set[int] = set()  # publishers whose hello arrived
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
                topic, raw = sock.recv_multipart()
                publisher, seq, sent_at, body = pickle.loads(raw)
                if topic.decode() == HELLO:
                    self.heard.add(publisher)
                else:
                    self._messages.put(Message(topic.decode(), publisher, seq, sent_at, time.time(), body))
        sock.close(linger=0)

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
