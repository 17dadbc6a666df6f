"""Lab 07: typical wrong answers get the diagnosis that names their mistake (the reference solutions pass
in test_labs.py)."""

import pytest

from distlab.labs import grading
from distlab.labs.solutions import ref07


def strict_bound(clock, clocks, s, dead=frozenset()):
    return clock - min(c for w, c in clocks.items() if w not in dead) < s


def counts_the_dead(clock, clocks, s, dead=frozenset()):
    return clock - min(clocks.values()) <= s


def against_the_fastest(clock, clocks, s, dead=frozenset()):
    return max(c for w, c in clocks.items() if w not in dead) - clock <= s


def forgets_to_return(clock, clocks, s, dead=frozenset()):
    clock - min(clocks.values()) <= s  # noqa: B015 (the mistake under test: the comparison is never returned)


@pytest.mark.parametrize("solution, says", [
    (strict_bound, "off by one: a worker may run exactly s clocks ahead"),
    (counts_the_dead, "you counted the clocks of dead workers"),
    (against_the_fastest, "cases wrong; the first: a worker at clock 4"),
    (forgets_to_return, "return True (may proceed) or False (must wait), got None"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_gate_gets_its_diagnosis(solution, says):
    verdict = grading.grade("07.ssp_gate", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_the_off_by_one_shows_a_case_on_the_boundary():
    verdict = grading.grade("07.ssp_gate", strict_bound)
    example = "for example, a worker at clock 3, clocks {1: 3, 2: 3, 3: 3}, s = 0 (BSP)"
    assert example in verdict.details[0], str(verdict)


def _with_read(read):
    """A quorum client whose writes are right and whose read is `read`."""
    def client(replies, value=None, writer=None):
        return read(replies) if value is None else ref07.quorum_read_write(replies, value, writer)
    return client


def _with_version(version):
    """A quorum client whose reads are right and whose writes get `version(replies, writer)`."""
    def client(replies, value=None, writer=None):
        return ref07.quorum_read_write(replies) if value is None else version(replies, writer)
    return client


def waits_for_two_replies(replies, value=None, writer=None):
    """Stops listening after two replies: as if R were 2, whatever the quorum."""
    return ref07.quorum_read_write(replies[:2], value, writer)


@pytest.mark.parametrize("solution, says", [
    (_with_read(lambda replies: replies[0]), "you returned the first reply to arrive"),
    (_with_read(lambda replies: replies[-1]), "you returned the last reply to arrive"),
    (_with_read(lambda replies: max(replies, key=lambda r: str(r[0]))), "you picked the largest value"),
    (_with_read(lambda replies: max(replies, key=lambda r: r[1][0])), "compare whole versions (counter, writer)"),
    (_with_read(lambda replies: max(replies, key=lambda r: r[1])[0]), "a read returns one (value, version) pair"),
    (_with_version(lambda replies, writer: (replies[0][1][0] + 1, writer)), "counted on from the first reply"),
    (_with_version(lambda replies, writer: max(r[1] for r in replies)), "reuses the highest counter seen"),
    (_with_version(lambda replies, writer: (max(r[1] for r in replies)[0] + 1, 0)), "tag the version with the writer"),
    (_with_version(lambda replies, writer: max(r[1] for r in replies)[0] + 1), "a version is a tuple (counter, "),
    (waits_for_two_replies, "R = 3, W = 3 (R + W > N: every read quorum meets every write quorum), a read was stale"),
], ids=["first reply", "last reply", "largest value", "counter only", "value only", "write from first reply",
        "no +1", "no writer tag", "int version", "two replies only"])
def test_a_wrong_quorum_gets_its_diagnosis(solution, says):
    verdict = grading.grade("07.quorum_read_write", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_a_stale_read_shows_the_replies_it_was_given():
    verdict = grading.grade("07.quorum_read_write", waits_for_two_replies)
    assert verdict.details and verdict.details[0].startswith("its 3 replies were [("), str(verdict)
