"""The linearizability search on hand-made histories, against brute force, and beside checker.py."""

import itertools
import math
import random

import pytest

from distlab.consistency import linearizability as lin
from distlab.consistency.checker import linearizability_violations
from distlab.consistency.store import INITIAL, Op


def write(value, invoke, complete, rank=0, version=(0, 0), key="x", outcome="ok"):
    return Op("write", rank, key, value, version, invoke, complete, outcome)


def read(value, invoke, complete, rank=1, version=INITIAL, key="x"):
    return Op("read", rank, key, value, version, invoke, complete)


# -- hand-made histories ----------------------------------------------------------------------------
LINEARIZABLE = {
    "empty register reads None": [read(None, 0, 1)],
    "read after write": [write("a", 0, 1), read("a", 2, 3)],
    "concurrent read may see either": [write("a", 0, 1), write("b", 2, 5), read("a", 3, 4), read("b", 3.5, 4.5, 2)],
    "concurrent writes in either order": [write("a", 0, 10), write("b", 0, 10, 2), read("b", 1, 2), read("a", 3, 4)],
    "a timed-out write that never happened": [write("a", 0, 1), write("b", 2, math.inf, outcome="unknown"),
                                              read("a", 3, 4), read("a", 5, 6)],
    "a timed-out write that did happen": [write("a", 0, 1), write("b", 2, math.inf, outcome="unknown"),
                                          read("a", 3, 4), read("b", 5, 6)],
}
NOT_LINEARIZABLE = {  # name: (history, index of the op that makes it fail, the length of the failing prefix)
    "stale read": ([write("a", 0, 1), write("b", 2, 3), read("a", 4, 5)], 2, 3),
    "value never written": ([write("a", 0, 1), read("zzz", 2, 3)], 1, 2),
    "read before its write began": ([read("a", 0, 1), write("a", 2, 3)], 0, 1),
    "new then old (inversion)": ([write("a", 0, 1), write("b", 2, 10), read("b", 3, 4), read("a", 5, 6, 2)], 3, 4),
    "a timed-out write seen, then unseen": ([write("a", 0, 1), write("b", 2, math.inf, outcome="unknown"),
                                            read("b", 3, 4), read("a", 5, 6)], 3, 4),
}


@pytest.mark.parametrize("name", sorted(LINEARIZABLE))
def test_a_linearizable_history_is_accepted_with_an_order_that_respects_real_time(name):
    ops = LINEARIZABLE[name]
    verdict = lin.check(ops)
    assert verdict.ok, str(verdict)
    order = verdict.keys["x"].order
    answered = [op for op in lin.usable(ops) if op.complete != math.inf]
    assert set(answered) <= set(order)
    for a, b in itertools.combinations(order, 2):  # a before b in the order: b did not end before a began
        assert not b.complete < a.invoke
    value = None  # and replaying the order on a register gives every read its value
    for op in order:
        value = op.value if op.kind == "write" else value
        assert op.kind == "write" or op.value == value


@pytest.mark.parametrize("name", sorted(NOT_LINEARIZABLE))
def test_a_non_linearizable_history_is_rejected_with_its_smallest_failing_prefix(name):
    ops, culprit, length = NOT_LINEARIZABLE[name]
    verdict = lin.check(ops)
    assert verdict.result == lin.NOT_LINEARIZABLE
    found = verdict.keys["x"]
    assert found.culprit.invoke == ops[culprit].invoke and found.culprit.kind == ops[culprit].kind
    assert len(found.prefix) == length
    assert lin.check(found.prefix).result == lin.NOT_LINEARIZABLE  # the prefix fails on its own
    assert f"no order of the first {length} operations explains" in found.explanation


# -- what the version-trusting checker misses ---------------------------------------------------------
W_A = write("a", 0, 1, version=(1, 0))
W_B = write("b", 2, 10, rank=2, version=(2, 0))  # long: concurrent with what follows
LOST_WRITE = [  # c begins after a read saw b, so c is after b; yet it got an older version (a quorum missed b)
    W_A, W_B, read("b", 3, 4, version=(2, 0)), write("c", 5, 6, rank=1, version=(1, 5)),
    read("b", 7, 8, rank=3, version=(2, 0)),  # after c completed: must be c
]
OUT_VERSIONED = [  # b begins after a read saw a, so b is after a; its version is older: LWW would drop b
    write("a", 0, 10, version=(1, 0)), read("a", 1, 2, version=(1, 0)), write("b", 3, 4, rank=2, version=(0, 5)),
    read("a", 5, 6, rank=3, version=(1, 0)),  # after b completed: must be b
]


@pytest.mark.parametrize("ops", [LOST_WRITE, OUT_VERSIONED], ids=["lost write", "out-versioned write"])
def test_histories_the_necessary_condition_checker_accepts_but_no_register_could_produce(ops):
    assert linearizability_violations(ops) == []
    assert lin.check(ops).result == lin.NOT_LINEARIZABLE


def test_the_lost_write_is_named_as_the_read_that_should_have_seen_it():
    found = lin.check(LOST_WRITE).keys["x"]
    assert found.culprit == LOST_WRITE[-1] and len(found.prefix) == 5


# -- brute force: every order of every subset of the pending writes -----------------------------------
def brute_force(ops: list[Op]) -> bool:
    answered = [op for op in ops if op.complete != math.inf]
    pending = [op for op in ops if op.complete == math.inf]
    for n in range(len(pending) + 1):
        for chosen in itertools.combinations(pending, n):
            for order in itertools.permutations(answered + list(chosen)):
                if _legal(order):
                    return True
    return False


def _legal(order) -> bool:
    value = None
    for i, op in enumerate(order):
        if any(later.complete < op.invoke for later in order[i + 1:]):
            return False
        if op.kind == "read" and op.value != value:
            return False
        value = op.value if op.kind == "write" else value
    return True


def random_history(rng: random.Random, n: int) -> list[Op]:
    """n ops on one key by 3 clients, overlapping; values read from a few written ones, sometimes pending."""
    ops, values = [], [None]
    for i in range(n):
        invoke = rng.uniform(0, 10)
        complete = invoke + rng.uniform(0.1, 4)
        if rng.random() < 0.45:
            pending = rng.random() < 0.2
            ops.append(write(f"v{i}", invoke, math.inf if pending else complete, rng.randrange(3),
                             outcome="unknown" if pending else "ok"))
            values.append(f"v{i}")
        else:
            ops.append(read(rng.choice(values), invoke, complete, rng.randrange(3)))
    return ops


def test_the_search_agrees_with_brute_force_on_300_random_histories():
    rng = random.Random(7)
    outcomes = []
    for _ in range(300):
        ops = random_history(rng, rng.randint(2, 6))
        expected = brute_force(ops)
        assert lin.check(ops).ok == expected, ops
        outcomes.append(expected)
    assert 30 < sum(outcomes) < 270  # both kinds were tested


def test_it_agrees_with_the_necessary_condition_checker_where_that_one_applies():
    """checker.py trusts the versions as the order of writes; where real time already orders the writes (no
    two overlap) that trust is sound, and then the two agree exactly: on 300 such register histories, half of
    them with one read turned stale."""
    rng, checked, rejected = random.Random(3), 0, 0
    while checked < 300:
        ops = versioned_history(rng, 6)
        writes = [op for op in ops if op.kind == "write"]
        if any(a.invoke < b.complete and b.invoke < a.complete for a, b in itertools.combinations(writes, 2)):
            continue  # overlapping writes: the search may order them against their versions
        checked += 1
        searched = lin.check(ops).ok
        assert (not linearizability_violations(ops)) == searched, ops
        rejected += not searched
    assert 30 < rejected < 270


def versioned_history(rng: random.Random, n: int) -> list[Op]:
    """A real register run (each op at a random instant in its interval, versions numbered in that order),
    then with probability 1/2 one read replaced by an older value, the usual way a store goes wrong."""
    spans = sorted((rng.uniform(0, 10), rng.uniform(0.1, 3)) for _ in range(n))
    points = sorted(range(n), key=lambda i: spans[i][0] + rng.uniform(0, spans[i][1]))
    ops, value, version, written = [None] * n, None, INITIAL, [(None, INITIAL)]
    for counter, i in enumerate(points, start=1):
        invoke, length = spans[i]
        if rng.random() < 0.4:
            value, version = f"v{counter}", (counter, 0)
            written.append((value, version))
            ops[i] = write(value, invoke, invoke + length, version=version)
        else:
            ops[i] = read(value, invoke, invoke + length, version=version)
    reads = [i for i, op in enumerate(ops) if op.kind == "read"]
    if reads and rng.random() < 0.5:
        i = rng.choice(reads)
        old_value, old_version = rng.choice(written)
        ops[i] = read(old_value, ops[i].invoke, ops[i].complete, version=old_version)
    return ops


def test_keys_are_checked_apart_and_the_bound_gives_unknown_not_a_guess():
    x = [write("a", 0, 1), read("a", 2, 3)]
    y = [write("b", 0, 1, key="y"), read(None, 2, 3, key="y")]
    verdict = lin.check(x + y)
    assert verdict.result == lin.NOT_LINEARIZABLE
    assert verdict.keys["x"].result == lin.LINEARIZABLE
    assert [k.key for k in verdict.failures()] == ["y"]
    wide = [write(f"w{i}", 0, 100, rank=i) for i in range(12)] + [read("nope", 101, 102)]
    bounded = lin.check(wide, max_steps=500)
    assert bounded.result == lin.UNKNOWN and bounded.steps == 501
    assert "gave up after 500 steps" in str(bounded)


def test_memoisation_keeps_many_concurrent_writes_cheap():
    """12 concurrent writes then a read of the last-written value: 12! orders, but (set taken, value) pairs
    number at most 2^12 * 13; the search stays far below that."""
    ops = [write(f"w{i}", 0, 100, rank=i) for i in range(12)] + [read("w5", 101, 102)]
    verdict = lin.check(ops)
    assert verdict.ok and verdict.steps < 2 ** 12 * 13
