"""Lab 07 · Consistency models: the stale-synchronous-parallel gate, and a quorum read and write.

Both in-process. The SSP gate is graded on a few hundred clock configurations (BSP, SSP, ASP; some
workers dead) against the library's own rule: a `parameter_server.Server` holding those clocks, asked
whether it answers a pull on hold. The quorum exercise first probes the student's read (pick by version,
not by arrival order or value) and version assignment, then runs it in a simulated store of N = 5
`store.Replica`s — each write stored on W of them before it completes, the others later — and grades
the recorded history with `consistency.checker`: with R + W > N no read may be stale.
"""

from __future__ import annotations

import math
import random
import time
from unittest import mock

import torch

from ..architectures import parameter_server as ps
from ..consistency import checker
from ..consistency.store import INITIAL, Op, Replica
from .grading import Passed, Wrong, call_student, exercise

# -- the SSP gate -------------------------------------------------------------------------------------

BOUNDS = (0, 1, 2, 3, math.inf)
EDGE_CASES = (  # (clock, clocks, s, dead): the boundaries a rule gets wrong first
    (3, {1: 3, 2: 3, 3: 3}, 0, frozenset()),
    (4, {1: 4, 2: 3, 3: 4}, 0, frozenset()),
    (5, {1: 5, 2: 3, 3: 4}, 2, frozenset()),
    (6, {1: 6, 2: 3, 3: 5}, 2, frozenset()),
    (5, {1: 5, 2: 0, 3: 4}, 2, frozenset({2})),
    (50, {1: 50, 2: 0, 3: 1}, math.inf, frozenset()),
    (7, {1: 7}, 0, frozenset()),
)


def gate_cases(count: int = 300, seed: int = 0) -> list[tuple]:
    """The edge cases, then `count` random ones: 1-5 workers, clocks 0-6, sometimes one or two dead."""
    rng, cases = random.Random(seed), list(EDGE_CASES)
    for _ in range(count):
        workers = list(range(1, rng.randint(1, 5) + 1))
        clocks = {w: rng.randint(0, 6) for w in workers}
        dead = frozenset(rng.sample(workers, min(len(workers) - 1, rng.randint(1, 2)))) if rng.random() < 0.4 \
            else frozenset()
        live = [w for w in workers if w not in dead]  # at least one: the one that asks
        cases.append((clocks[rng.choice(live)], clocks, rng.choice(BOUNDS), dead))
    return cases


def library_gate(clock: int, clocks: dict, s: float, dead: frozenset) -> bool:
    """Whether the library's server answers at once a pull at `clock`: a Server holding these clocks (under
    BSP, with every completed round applied) and the pull on hold; its sends are captured, not made."""
    asker = next(w for w, c in clocks.items() if c == clock and w not in dead)
    server = ps.Server(torch.zeros(1), list(clocks), ps.Config(staleness=s), time.time())
    server.clock.update(clocks)
    server.state.update(dict.fromkeys(dead, "dead"))
    server.version = server.slowest_clock()
    server.waiting[asker] = (clock, time.time())
    with mock.patch.object(ps.dist, "send"):
        server.answer_pulls()
    return asker not in server.waiting


def _say(case: tuple, answer: bool) -> str:
    clock, clocks, s, dead = case
    slowest = min(c for w, c in clocks.items() if w not in dead)
    gap = clock - slowest
    bound = "inf (ASP)" if s == math.inf else f"{s}" + (" (BSP)" if s == 0 else "")
    dead_part = f", dead {sorted(dead)}" if dead else ""
    verdict = "may proceed" if gap <= s else "must wait"
    return (f"a worker at clock {clock}, clocks {clocks}{dead_part}, s = {bound}: the slowest live worker is at "
            f"{slowest}, the gap is {gap} {'<=' if gap <= s else '>'} s, so it {verdict}; you said {answer}")


def _as_bool(answer) -> bool:
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if type(answer).__name__ not in ("bool", "bool_"):
        raise Wrong(f"return True (may proceed) or False (must wait), got {answer!r}")
    return bool(answer)


def _explain_gate(cases: list[tuple], answers: list[bool], wrong: list[int]) -> Wrong:
    """The rule the student's answers follow, if it is a usual mistake; else the first case they got wrong."""
    def gap(case, counting_dead=False):
        clock, clocks, _, dead = case
        return clock - min(c for w, c in clocks.items() if counting_dead or w not in dead)

    rules = {
        "off by one: a worker may run exactly s clocks ahead of the slowest (gap <= s, not gap < s); with <, BSP "
        "(s = 0) would never let anyone proceed":
            lambda case: gap(case) < case[2],
        "you counted the clocks of dead workers: a dead worker never pushes again, so the bound is against the "
        "slowest *live* worker (waiting for the dead blocks everyone for good)":
            lambda case: gap(case, counting_dead=True) <= case[2],
    }
    example = _say(cases[wrong[0]], answers[wrong[0]])
    for why, rule in rules.items():
        if all(rule(case) == answer for case, answer in zip(cases, answers)):
            return Wrong(why, f"for example, {example}")
    return Wrong(f"{len(wrong)} of {len(cases)} cases wrong; the first: {example}")


@exercise("07.ssp_gate", "The stale-synchronous-parallel gate")
def ssp_gate(fn) -> Passed:
    cases = gate_cases()
    answers = [_as_bool(call_student(fn, clock, dict(clocks), s, frozenset(dead))) for clock, clocks, s, dead in cases]
    expected = [library_gate(*case) for case in cases]
    wrong = [i for i, (a, e) in enumerate(zip(answers, expected)) if a != e]
    if wrong:
        raise _explain_gate(cases, answers, wrong)
    kinds = {"BSP": sum(c[2] == 0 for c in cases), "ASP": sum(c[2] == math.inf for c in cases)}
    kinds["SSP"] = len(cases) - kinds["BSP"] - kinds["ASP"]
    measured = {"cases": ", ".join(f"{k} {v}" for k, v in kinds.items()) + f"; {sum(bool(c[3]) for c in cases)} with "
                f"dead workers; {sum(expected)} may proceed, {len(cases) - sum(expected)} must wait"}
    return Passed(f"agrees with parameter_server.Server on all {len(cases)} cases: gap to the slowest live worker <= s",
                  measured)


# -- quorum reads and writes --------------------------------------------------------------------------

N_REPLICAS = 5
QUORUMS = ((3, 3), (2, 4), (4, 2), (1, 5), (5, 1))  # R + W > N: every read quorum meets every write quorum
LOOSE = (2, 2)  # R + W <= N: measured, to show what the condition buys
READ_PROBES = (  # (replies in arrival order, the right answer)
    ([("m", (2, 1)), ("a", (4, 0)), ("z", (1, 2)), ("k", (3, 0))], ("a", (4, 0))),
    ([("p", (5, 0)), ("q", (5, 2)), ("r", (5, 1))], ("q", (5, 2))),
    ([(None, INITIAL), (None, INITIAL)], (None, INITIAL)),
    ([(None, INITIAL), ("x", (1, 3))], ("x", (1, 3))),
)
WRITE_PROBES = (  # (replies, writer, the version the write must get)
    ([("m", (2, 1)), ("a", (4, 0)), ("z", (1, 2))], 1, (5, 1)),
    ([(None, INITIAL), (None, INITIAL)], 2, (1, 2)),
)


def _read(fn, replies: list[tuple]) -> tuple:
    got = call_student(fn, list(replies))
    if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], tuple)):
        raise Wrong(f"a read returns one (value, version) pair, e.g. {replies[0]!r}; got {got!r}")
    return got


def _write(fn, replies: list[tuple], value, writer: int):
    return call_student(fn, list(replies), value=value, writer=writer)


def _probe_reads(fn) -> None:
    for replies, right in READ_PROBES:
        got = _read(fn, replies)
        if got == right:
            continue
        said = f"from the replies {replies} (in the order they arrived) you returned {got!r}; the newest is {right!r}"
        if got[1][0] == right[1][0]:
            raise Wrong("compare whole versions (counter, writer), not only the counter: when two writes have the "
                        "same counter, the writer breaks the tie, as tuples compare", said)
        if got == replies[0]:
            raise Wrong("you returned the first reply to arrive: arrival order says nothing about age — pick the "
                        "reply with the highest version", said)
        if got == replies[-1]:
            raise Wrong("you returned the last reply to arrive: pick the reply with the highest version", said)
        if got == max(replies, key=lambda reply: str(reply[0])):
            raise Wrong("you picked the largest value: values are data, versions say which write is newest — pick "
                        "the highest version", said)
        raise Wrong("a read returns the reply with the highest version", said)


def _probe_writes(fn) -> None:
    for replies, writer, right in WRITE_PROBES:
        got = _write(fn, replies, "new", writer)
        if got == right:
            continue
        said = f"replies {replies}, writer {writer}: you gave the version {got!r}, it should be {right!r}"
        if not (isinstance(got, tuple) and len(got) == 2 and all(isinstance(x, int) for x in got)):
            raise Wrong("a version is a tuple (counter, writer) of two ints, compared in order like the store's "
                        f"versions (a key never written has {INITIAL})", said)
        if got[0] == replies[0][1][0] + 1 and got[0] != right[0]:
            raise Wrong("you counted on from the first reply to arrive: the new version must be larger than every "
                        "version in the replies, so start from the highest", said)
        if got[0] == right[0] - 1:
            raise Wrong("your write reuses the highest counter seen: a replica keeps a value only if its version is "
                        "larger, so the new write needs counter + 1", said)
        if got[0] == right[0]:
            raise Wrong("tag the version with the writer, (counter + 1, writer): two writers that read the same "
                        "replies would otherwise give two different values the same version", said)
        raise Wrong("the new version is one past the highest counter in the replies, tagged with the writer", said)


class QuorumStore:
    """N replicas in one process: a read asks R of them (they answer in random order); a write learns the
    versions from R replicas, is stored on W before it completes, and reaches the others a few ticks later."""

    def __init__(self, fn, n: int, r: int, w: int, seed: int = 0):
        self.fn, self.n, self.r, self.w = fn, n, r, w
        self.rng = random.Random(seed)
        self.replicas = [Replica() for _ in range(n)]
        self.late: list[tuple] = []  # (due tick, replica, key, value, version)
        self.ops: list[Op] = []
        self.replies: dict[Op, list[tuple]] = {}  # what each read was answered
        self.messages = {"read": 0, "write": 0}

    def ask(self, key: str, kind: str) -> list[tuple]:
        self.messages[kind] += 2 * self.r  # a request and a reply per replica asked
        return [self.replicas[i].get(key) for i in self.rng.sample(range(self.n), self.r)]

    def deliver(self, tick: int) -> None:
        for item in [item for item in self.late if item[0] <= tick]:
            self.late.remove(item)
            self.replicas[item[1]].merge(*item[2:])

    def read(self, client: int, key: str, tick: int) -> None:
        replies = self.ask(key, "read")
        value, version = _read(self.fn, replies)
        self.ops.append(Op("read", client, key, value, version, tick, tick + 0.5))
        self.replies[self.ops[-1]] = replies

    def writes(self, clients: list[int], key: str, tick: int) -> None:
        """Writes by several clients at once: every one learns its version before any is stored."""
        versions = [_write(self.fn, self.ask(key, "write"), f"c{c}.{tick}", c) for c in clients]
        for client, version in zip(clients, versions):
            value, order = f"c{client}.{tick}", self.rng.sample(range(self.n), self.n)
            for i in order[:self.w]:
                self.replicas[i].merge(key, value, version)  # the W acks the write waits for
            self.late.extend((tick + self.rng.randint(1, 8), i, key, value, version) for i in order[self.w:])
            self.messages["write"] += 2 * self.n  # the value to every replica, an ack from each
            self.ops.append(Op("write", client, key, value, version, tick, tick + 0.5))

    def run(self, ticks: int = 120) -> list[Op]:
        """Reads (55%), single writes (30%) and two concurrent writes (15%) on two keys by three clients."""
        for tick in range(ticks):
            self.deliver(tick)
            roll, key = self.rng.random(), f"k{self.rng.randrange(2)}"
            if roll < 0.55:
                self.read(self.rng.randrange(3), key, tick)
            else:
                self.writes(self.rng.sample(range(3), 1 if roll < 0.85 else 2), key, tick)
        return self.ops


def _explain_history(store: QuorumStore) -> None:
    ops, stale = store.ops, checker.stale_reads(store.ops)
    quorums = f"N = {store.n}, R = {store.r}, W = {store.w} (R + W > N: every read quorum meets every write quorum)"
    if stale:
        read = stale[0]
        raise Wrong(f"with {quorums}, a read was stale: client {read.rank} read {read.key} at tick {read.invoke:.0f} "
                    f"and returned {read.value!r} @ {read.version}, older than a write that had completed before",
                    f"its {store.r} replies were {store.replies[read]}: use every one of them, the newest version wins")
    violations = checker.linearizability_violations(ops)
    if violations:
        first = violations[0]
        raise Wrong(f"with {quorums}, the checker found {len(violations)} violation(s); the first, a {first.kind} by "
                    f"client {first.op.rank} on {first.op.key}: {first.detail}")


@exercise("07.quorum_read_write", "Quorum reads and writes on N replicas")
def quorum_read_write(fn) -> Passed:
    _probe_reads(fn)
    _probe_writes(fn)
    stores = [QuorumStore(fn, N_REPLICAS, r, w) for r, w in QUORUMS]
    for store in stores:
        store.run()
        _explain_history(store)
    loose = QuorumStore(fn, N_REPLICAS, *LOOSE)
    loose.run()
    first = stores[0]
    count = {kind: sum(op.kind == kind for op in first.ops) for kind in ("read", "write")}
    measured = {
        "R + W > N": f"0 stale reads in {sum(op.kind == 'read' for s in stores for op in s.ops)} reads over "
                     f"{len(QUORUMS)} quorum choices {list(QUORUMS)}; the checker finds no violation",
        f"R = {LOOSE[0]}, W = {LOOSE[1]} (R + W <= N)":
            f"{len(checker.stale_reads(loose.ops))} stale reads of {sum(op.kind == 'read' for op in loose.ops)}, "
            f"{sum(v.kind == 'write order' for v in checker.linearizability_violations(loose.ops))} writes ordered "
            "wrongly: the quorums need not meet",
        f"messages with R = {first.r}, W = {first.w}": f"{first.messages['read'] / count['read']:.0f} per read (2R), "
                                                       f"{first.messages['write'] / count['write']:.0f} per write "
                                                       "(2R to learn the version, 2N to store it)",
    }
    return Passed(f"reads pick the highest version, writes count on from it; on {N_REPLICAS} replicas with R + W > N "
                  "every read returned the latest completed write", measured)
