"""On a shared server (DESIGN.md): nothing distlab starts runs code sent by someone else, lets another user
in, or listens beyond loopback. Each attack here is one a local user could try."""

import ipaddress
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import psutil
import pytest
import torch.distributed as dist
import zmq

import distlab as dl
from conftest import rank_processes
from distlab.communication import pubsub, rpc
from distlab.consistency.store import Store
from distlab.resilience.faults import FaultControl

# A process of this user (so it can reach the endpoint) that sends what the endpoint's owner would
# unpickle: a pickle whose __reduce__ creates the marker file. argv: store|broker, endpoint, marker, seconds.
ATTACK = r"""
import os, pickle, shlex, sys, time, zmq
kind, endpoint, marker, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + shlex.quote(marker),))

evil = pickle.dumps(Payload())
context = zmq.Context()
if kind == "store":
    sock = context.socket(zmq.DEALER)
    sock.connect(endpoint)
    for frames in ([evil], [evil], [b"not json"], [b'["drop", "x"]'], [b'["write", ["x"]]'], [b"[" * 100000],
                   [b"two", b"frames"]):
        sock.send_multipart(frames)
else:
    sock = context.socket(zmq.PUB)
    sock.connect(endpoint)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for topic in (b"metrics", b"_hello"):
            sock.send_multipart([topic, evil])
        sock.send_multipart([b"metrics", b"[1, 2, 3]"])
        time.sleep(0.01)
sock.close(linger=2000)
context.term()
"""

NOT_JSON = "not a JSON [kind, payload] pair"


def attack(kind: str, endpoint: str, marker, seconds: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ATTACK, kind, endpoint, str(marker), str(seconds)])


def attacked_store(ctx, marker: str) -> dict:
    """Rank function: a strong store whose every replica gets the attack; then a write and reads through it."""
    store = Store(ctx.rank, ctx.world_size, "strong", timeout=5.0)
    try:
        dist.barrier()
        if ctx.rank == 0:
            for endpoint in store.net.endpoints:
                assert attack("store", endpoint, marker).wait(timeout=30) == 0
            time.sleep(0.5)  # the serving threads read what it sent
        dist.barrier()
        if ctx.rank == 1:
            store.write("after", "still serving")
        dist.barrier()
        value = store.read("after")
        store.stop()
        dist.barrier()
    finally:
        store.close()
    return {"value": value, "refused": dict(store.net.refused), "folder_left": os.path.exists(store.net.folder)}


@pytest.mark.timeout(120)
def test_a_pickle_sent_to_the_store_runs_nothing_and_the_store_keeps_serving(tmp_path):
    marker = tmp_path / "pwned"
    run = dl.launch(attacked_store, world_size=2, timeout=90, marker=str(marker))
    assert not marker.exists(), "unpickling the attacker's frame ran its code"
    for rank, result in enumerate(run.results):
        assert result["value"] == ("still serving", (1, 0))
        assert result["refused"][NOT_JSON] == 4  # two pickles, b"not json" and a bracket too deep for JSON
        assert set(result["refused"]) == {NOT_JSON, "an unknown kind of request", "a write is not a list of 2",
                                          "not one frame"}
        assert run.logs(rank).count("refused a message") == 4  # once per reason, not once per frame
        assert not result["folder_left"]


def flowing(broker, within: float = 30.0) -> None:
    """Wait until the attack passes through the broker: a plain SUB socket here (which unpickles nothing)
    receives some of it."""
    watcher = zmq.Context.instance().socket(zmq.SUB)
    watcher.connect(broker.subscribe_address)
    watcher.setsockopt(zmq.SUBSCRIBE, b"metrics")
    arrived = watcher.poll(within * 1000)
    watcher.close(linger=0)
    assert arrived, "the attack never reached the broker's subscribers"


@pytest.mark.timeout(120)
def test_a_pickle_published_through_the_broker_runs_nothing_and_messages_still_arrive(tmp_path):
    marker = tmp_path / "pwned"
    with pubsub.Broker() as broker:
        attacker = attack("broker", broker.publish_address, marker, seconds=60)
        try:
            flowing(broker)
            run = dl.launch(pubsub.exchange, world_size=2, publish_address=broker.publish_address,
                            subscribe_address=broker.subscribe_address, messages=50, timeout=90)
        finally:
            attacker.kill()
            attacker.wait()
    assert not marker.exists(), "unpickling the attacker's message ran its code"
    for rank, got in enumerate(run.results):
        assert sorted((topic, publisher) for topic, publisher, *_ in got) == sorted(
            [("metrics", 0)] * 50 + [("metrics", 1)] * 50 + [(f"grad/{1 - rank}", 1 - rank)] * 50)
        log = run.logs(rank)
        assert log.count("refused a message (not a JSON [publisher, seq, sent_at, body])") == 1, log


# -- what listens, sampled once every rank is listening -----------------------------------------------

def hold(ctx, **shown) -> None:
    """Tell the test this rank is up (with what it should look at), then wait until it has looked."""
    (ctx.run_dir / f"ready-{ctx.rank}").write_text(json.dumps(shown))
    deadline = time.monotonic() + 60
    while not (ctx.run_dir / "looked").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def gloo_ranks(ctx, **_) -> None:
    dist.barrier()
    hold(ctx)


def rpc_ranks(ctx, **_) -> None:
    rpc.start(ctx)
    hold(ctx)
    rpc.rpc.shutdown()


def store_ranks(ctx, **_) -> None:
    store = Store(ctx.rank, ctx.world_size, "strong")
    try:
        dist.barrier()
        hold(ctx, endpoint=store.net.endpoints[ctx.rank])
        store.stop()
        dist.barrier()
    finally:
        store.close()


def pubsub_ranks(ctx, publish_address: str, subscribe_address: str) -> None:
    subscriber, publisher = pubsub.Subscriber(subscribe_address, ["x"]), pubsub.Publisher(publish_address, ctx.rank)
    pubsub.handshake(publisher, subscriber, publishers=ctx.world_size)
    hold(ctx)
    publisher.close()
    subscriber.close()


SCENARIOS = {"gloo": gloo_ranks, "rpc": rpc_ranks, "store": store_ranks, "pubsub": pubsub_ranks}


def listening(pids) -> list[str]:
    """The address of every listening TCP socket (IPv4 and IPv6) of these processes."""
    return [conn.laddr.ip for pid in pids for conn in psutil.Process(pid).net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN]


def on_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


def shown_once_up(run, world_size: int, within: float = 90.0) -> list[dict]:
    """What each rank passed to hold(), once all have; a rank that failed first raises its failure."""
    deadline = time.monotonic() + within
    while len(ready := sorted(run.dir.glob("ready-*"))) < world_size:
        if run.status != "running" or time.monotonic() > deadline:
            run.wait()
            raise AssertionError(f"only {len(ready)} of {world_size} ranks came up")
        time.sleep(0.05)
    return [json.loads(path.read_text()) for path in ready]


def run_and_look(scenario: str, broker, world_size: int = 3):
    """Launch a scenario, and while every rank holds: (listening addresses, what the ranks showed, rank pids)."""
    kwargs = {"publish_address": broker.publish_address, "subscribe_address": broker.subscribe_address}
    run = dl.launch(SCENARIOS[scenario], world_size, block=False, fresh=scenario == "rpc", timeout=120, **kwargs)
    try:
        shown = shown_once_up(run, world_size)
        pids = [p.pid for p in rank_processes()]
        addresses = listening([*pids, os.getpid()])
    finally:
        (run.dir / "looked").touch()
    run.wait()
    return run, addresses, shown, pids


@pytest.mark.timeout(180)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_once_every_rank_listens_nothing_listens_beyond_loopback(scenario):
    with pubsub.Broker() as broker:
        run, addresses, _, pids = run_and_look(scenario, broker)
    assert len(pids) == 3
    assert addresses, "the ranks' gloo sockets, at least, should be listening"
    assert all(on_loopback(ip) for ip in addresses), addresses
    assert stat.S_IMODE(run.dir.stat().st_mode) == 0o700


# -- endpoints another user cannot open ------------------------------------------------------------

REACH = r"""
import socket, sys
where = sys.argv[1]
if where.startswith("tcp://"):
    host, port = where[len("tcp://"):].rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=5).close()
elif where.startswith("ipc://"):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(where[len("ipc://"):])
else:
    open(where, "ab").close()
"""
NOBODY = 65534


def reach(where: str, python: str, as_nobody: bool) -> bool:
    """Can a process (of this user, or of uid 65534) connect to this endpoint or open this file?"""
    who = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if as_nobody else {}
    done = subprocess.run([python, "-c", REACH, where], cwd="/", env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, timeout=30, **who)
    return done.returncode == 0


def python_for_nobody() -> str | None:
    """A Python that uid 65534 may run (this one may live in root's home), or None."""
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3", shutil.which("python3") or ""]):
        try:
            if python and subprocess.run([python, "-c", "pass"], cwd="/", user=NOBODY, group=NOBODY,
                                         extra_groups=[], capture_output=True).returncode == 0:
                return python
        except OSError:  # not executable by that user
            continue
    return None


def as_endpoint(address: str) -> str:
    """FaultControl's address is a file path now; it was host:port."""
    return address if "://" in address or os.path.isabs(address) else f"tcp://{address}"


@pytest.mark.timeout(180)
@pytest.mark.skipif(os.geteuid() != 0, reason="trying as another user needs root (to become uid 65534)")
def test_another_user_can_open_neither_the_store_nor_the_broker_nor_the_fault_control():
    python = python_for_nobody()
    if python is None:
        pytest.skip("no Python here that uid 65534 may run")
    control = FaultControl()
    with pubsub.Broker() as broker:
        endpoints = [broker.publish_address, broker.subscribe_address, as_endpoint(control.address)]
        run = dl.launch(store_ranks, 2, block=False, timeout=120)
        try:
            endpoints += [shown["endpoint"] for shown in shown_once_up(run, 2)]
            ours = {where: reach(where, python, as_nobody=False) for where in endpoints}
            theirs = {where: reach(where, python, as_nobody=True) for where in endpoints}
        finally:
            (run.dir / "looked").touch()
        run.wait()
    assert all(ours.values()), ours  # the endpoints were live: the check below means something
    assert not any(theirs.values()), f"another user got in: {[w for w, ok in theirs.items() if ok]}"
