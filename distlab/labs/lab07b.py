"""Lab 07b · Consistency under faults: write the quorum read; the linearizability checker grades it.

The student writes the read of the quorum store (distlab/consistency/store.py, mode "quorum"): ask R
replicas, return the newest reply, and write it back until W replicas hold it. Graded in two steps:

1. In-process, on scripted situations of N = 3 replicas (R = W = 2) with the library's own `Replica`s: the
   newest reply by whole version, and a write that reached one replica only (its writer timed out), read
   twice by two clients. Each situation's recorded history goes to `linearizability.check`; a mistake is
   named (the local replica trusted, the largest value, the counter alone, no write-back, a new version).
2. On three real ranks, the student's read inside the store under 30% message loss; the whole history
   must be linearizable (the search, not the necessary conditions).
"""

from __future__ import annotations

import functools
import math

from ..consistency import linearizability
from ..consistency.faults import lossy
from ..consistency.store import Op, Replica, Unavailable, run_workload
from .grading import Passed, Wrong, call_student, exercise, on_ranks

N, R, W = 3, 2, 2


class ScriptedReplicas:
    """N replicas in one process and the history of what clients did to them, one tick per step."""

    def __init__(self):
        self.replicas = [Replica() for _ in range(N)]
        self.ops: list[Op] = []
        self.tick = 0.0
        self.writes_back = 0

    def write(self, rank: int, key: str, value, version: tuple, reaches: tuple, completed: bool = True) -> None:
        """A write that reached the replicas `reaches`; not `completed`: its writer timed out (unknown)."""
        for i in reaches:
            self.replicas[i].merge(key, value, version)
        end, outcome = (self.tick + 1, "ok") if completed else (math.inf, "unknown")
        self.ops.append(Op("write", rank, key, value, version, self.tick, end, outcome))
        self.tick += 2

    def read(self, fn, rank: int, key: str, answering: tuple) -> tuple:
        """The student's read by client `rank`, the peers in `answering` replying (in that order)."""
        client = Client(self, rank, answering)
        got = call_student(fn, client, key)
        if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], tuple)):
            raise Wrong(f"a read returns one (value, version) pair, as a reply is; got {got!r}")
        self.ops.append(Op("read", rank, key, got[0], got[1], self.tick, self.tick + 1))
        self.tick += 2
        return got


class Client:
    """What the student's read sees of the store: the same `rank`, `r`, `w`, `ask` and `store_on` as Store."""

    def __init__(self, cluster: ScriptedReplicas, rank: int, answering: tuple):
        self.cluster, self.rank, self.answering, self.r, self.w = cluster, rank, answering, R, W

    def ask(self, key: str) -> dict:
        """{rank: (value, version)} from R replicas, this one first."""
        ranks = [self.rank, *self.answering][:self.r]
        return {i: self.cluster.replicas[i].get(key) for i in ranks}

    def store_on(self, key: str, value, version: tuple, holders=()) -> None:
        """Store on this replica and on every answering peer not in `holders`."""
        self.cluster.writes_back += 1
        for i in {self.rank, *self.answering} - set(holders):
            self.cluster.replicas[i].merge(key, value, version)
        if len({self.rank, *self.answering} | set(holders)) < self.w:
            raise Unavailable("no write quorum", "unknown")


def _newest_probe(fn, replies: dict, right: tuple, why: str) -> None:
    """A client whose replica and one peer hold `replies`: its read must return `right`."""
    cluster = ScriptedReplicas()
    for rank, (value, version) in replies.items():
        cluster.replicas[rank].merge("x", value, version)
    reader, peer = list(replies)
    got = cluster.read(fn, reader, "x", (peer,))
    if got == right:
        return
    said = f"{why}: the replies were {replies} (rank {reader}'s own replica first); you returned {got!r}, not {right!r}"
    if got[1][0] == right[1][0]:
        raise Wrong("compare whole versions (counter, writer), not only the counter: the writer breaks ties", said)
    if got == max(replies.values(), key=lambda reply: str(reply[0])):
        raise Wrong("you picked the largest value: versions say which write is newest, values are data", said)
    if got == replies[reader]:
        raise Wrong("you returned this rank's own replica: it may have missed writes; the R replies together "
                    "hold the latest completed write, so return the reply with the highest version", said)
    if got[0] == right[0]:
        raise Wrong("a read returns the version it found, not a new one: a read that makes up versions is a "
                    "write in disguise", said)
    raise Wrong("a read returns the reply with the highest version", said)


def _partial_write(fn) -> ScriptedReplicas:
    """x = "a" everywhere; then "b" reaches rank 0's replica only (its writer timed out); rank 1 reads with
    rank 0 answering; then rank 2 reads with rank 1 answering."""
    cluster = ScriptedReplicas()
    cluster.write(0, "x", "a", (1, 0), reaches=(0, 1, 2))
    cluster.write(0, "x", "b", (2, 0), reaches=(0,), completed=False)
    cluster.read(fn, 1, "x", (0,))
    cluster.read(fn, 2, "x", (1,))
    return cluster


def _grade_partial_write(fn) -> ScriptedReplicas:
    cluster = _partial_write(fn)
    first, second = (op for op in cluster.ops if op.kind == "read")
    verdict = linearizability.check(cluster.ops)
    if verdict.ok:
        return cluster
    said = (f"'b' reached only rank 0 (its writer timed out); rank 1 read with rank 0 answering and got "
            f"{first.value!r}; then rank 2 read with rank 1 answering and got {second.value!r}")
    if first.value == "b" and second.value == "a":
        raise Wrong("a write seen, then unseen: the checker finds no order of these operations. Before you "
                    "return the newest reply, store it on W replicas (store.store_on(key, value, version, "
                    "holders=[ranks that replied it])) so that every later read quorum meets one of them", said,
                    verdict.failures()[0].explanation)
    raise Wrong("the checker finds no order of these operations", said, verdict.failures()[0].explanation)


def _on_ranks(fn) -> dict:
    """The student's read inside the quorum store on three ranks, 30% of messages lost, for 0.8 s."""
    work = functools.partial(run_workload, timeout=0.15)
    run = on_ranks(work, N, timeout=60, mode="quorum", quorum=(R, W), quorum_read=fn, ops=10_000, think=0.004,
                   duration=0.8, settle_timeout=0.2, schedule=lossy(0.3, start=0.0, end=0.8, seed=2))
    ops = sorted((op for r in run.results for op in r["ops"]), key=lambda op: op.invoke)
    verdict = linearizability.check(ops)
    if not verdict.ok:
        raise Wrong("on three ranks with 30% of messages lost, the history is not linearizable",
                    verdict.failures()[0].explanation)
    lost = sum(sum(r["lost"].values()) for r in run.results)
    return {"operations": len(ops), "answered": sum(op.outcome == "ok" for op in ops), "lost": lost,
            "steps": verdict.steps}


@exercise("07b.quorum_read", "The quorum read, graded by the linearizability checker")
def quorum_read(fn) -> Passed:
    _newest_probe(fn, {1: ("a", (1, 0)), 0: ("b", (2, 0))}, ("b", (2, 0)), "the peer holds the newer write")
    _newest_probe(fn, {2: ("z", (1, 0)), 1: ("b", (2, 1))}, ("b", (2, 1)), "the newer write has the smaller value")
    _newest_probe(fn, {0: ("p", (3, 0)), 2: ("q", (3, 2))}, ("q", (3, 2)), "the same counter, two writers")
    cluster = _grade_partial_write(fn)
    measured = _on_ranks(fn)
    return Passed("your read returns the newest of R replies and writes it back: every history is linearizable",
                  {"scripted": f"a write that reached 1 of {N} replicas, read twice: linearizable "
                               f"({cluster.writes_back} write-backs)",
                   "on 3 ranks, 30% messages lost": f"{measured['answered']} of {measured['operations']} operations "
                   f"answered, {measured['lost']} messages lost, linearizable ({measured['steps']} search steps)"})
