"""Lab 07b: typical wrong quorum reads get the diagnosis that names their mistake (the reference passes in
test_labs.py)."""

import pytest

from distlab.labs import grading
from distlab.labs.solutions import ref07b


def own_replica(store, key):
    return store.ask(key)[store.rank]


def largest_value(store, key):
    return max(store.ask(key).values(), key=lambda reply: str(reply[0]))


def counter_only(store, key):
    return max(store.ask(key).values(), key=lambda reply: reply[1][0])


def no_write_back(store, key):
    return max(store.ask(key).values(), key=lambda reply: reply[1])


def new_version(store, key):
    value, version = max(store.ask(key).values(), key=lambda reply: reply[1])
    fresh = (version[0] + 1, store.rank)
    store.store_on(key, value, fresh)
    return value, fresh


def value_only(store, key):
    return ref07b.quorum_read(store, key)[0]


@pytest.mark.parametrize("solution, says", [
    (own_replica, "you returned this rank's own replica"),
    (largest_value, "you picked the largest value"),
    (counter_only, "compare whole versions (counter, writer)"),
    (new_version, "a read returns the version it found, not a new one"),
    (value_only, "a read returns one (value, version) pair"),
    (no_write_back, "a write seen, then unseen: the checker finds no order"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_quorum_read_gets_its_diagnosis(solution, says):
    verdict = grading.grade("07b.quorum_read", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_the_missing_write_back_is_shown_with_the_checkers_failing_prefix():
    verdict = grading.grade("07b.quorum_read", no_write_back)
    assert "rank 1 read with rank 0 answering and got 'b'" in verdict.details[0]
    assert "no order of the first 4 operations explains read x='a' by rank 2" in verdict.details[1], str(verdict)
