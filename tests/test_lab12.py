"""Lab 12: typical wrong answers get the diagnosis that names their mistake (the reference solutions pass
in test_labs.py)."""

import pytest

from distlab.labs import grading
from distlab.labs.solutions import ref12


def seconds(model_mib, link_gbps, machines, payload=2 ** 20, bandwidth=1e9 / 8, ring=None, server=None):
    """The cost model with pluggable units and per-architecture byte counts (in copies of the model)."""
    n = machines
    ring = 2 * (n - 1) / n if ring is None else ring(n)
    server = 2 * (n - 1) if server is None else server(n)
    size, speed = model_mib * payload, link_gbps * bandwidth
    return {"all-reduce": ring * size / speed, "PS sync": server * size / speed}


def link_in_bytes(model_mib, link_gbps, machines):
    return seconds(model_mib, link_gbps, machines, bandwidth=1e9)


def megabytes(model_mib, link_gbps, machines):
    return seconds(model_mib, link_gbps, machines, payload=1e6)


def no_ring_factor(model_mib, link_gbps, machines):
    return seconds(model_mib, link_gbps, machines, ring=lambda n: 1)


def server_one_direction(model_mib, link_gbps, machines):
    return seconds(model_mib, link_gbps, machines, server=lambda n: n - 1)


def server_n_workers(model_mib, link_gbps, machines):
    return seconds(model_mib, link_gbps, machines, server=lambda n: 2 * n)


def bits_and_no_ring_factor(model_mib, link_gbps, machines):
    return seconds(model_mib, link_gbps, machines, bandwidth=1e9, ring=lambda n: 1)


def milliseconds(model_mib, link_gbps, machines):
    return {k: 1000 * v for k, v in ref12.choose_architecture(model_mib, link_gbps, machines).items()}


def a_tuple(model_mib, link_gbps, machines):
    return tuple(ref12.choose_architecture(model_mib, link_gbps, machines).values())


@pytest.mark.parametrize("solution, says", [
    (link_in_bytes, "all-reduce: you used the link speed as bytes per second: Gbit/s counts bits"),
    (megabytes, "all-reduce: you took a MiB as 10^6 bytes"),
    (no_ring_factor, "all-reduce: you left out the ring's 2(N-1)/N"),
    (server_one_direction, "PS sync: you counted one direction of the server's traffic"),
    (server_n_workers, "PS sync: you counted N workers"),
    (bits_and_no_ring_factor, "you left out the ring's 2(N-1)/N: each rank sends 2(N-1)/N·S per step (reduce-scatter, "
                              "then all-gather), not S; and you used the link speed as bytes per second"),
    (milliseconds, "you returned milliseconds"),
    (a_tuple, "return a dict with the keys ['all-reduce', 'PS sync']"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_wrong_seconds_get_their_diagnosis(solution, says):
    verdict = grading.grade("12.choose_architecture", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_an_unexplained_answer_shows_the_ratio_and_the_case():
    def made_up(model_mib, link_gbps, machines):
        return {"all-reduce": 3.0, "PS sync": 1.0}

    verdict = grading.grade("12.choose_architecture", made_up)
    assert verdict.summary.startswith("all-reduce: your seconds are ["), str(verdict)
    assert "yours 3 s, the cost model's 0.1468 s" in verdict.details[0]


def first_that_does_not_fit(model_mib, link_gbps, compute_s):
    return ref12.server_bottleneck(model_mib, link_gbps, compute_s) + 1


def bottleneck_one_direction(model_mib, link_gbps, compute_s):
    payload, bandwidth = model_mib * 2 ** 20, link_gbps * 1e9 / 8
    return int(compute_s * bandwidth // payload)


def bottleneck_in_bytes(model_mib, link_gbps, compute_s):
    payload, bandwidth = model_mib * 2 ** 20, link_gbps * 1e9
    return int(compute_s * bandwidth // (2 * payload))


def not_rounded(model_mib, link_gbps, compute_s):
    payload, bandwidth = model_mib * 2 ** 20, link_gbps * 1e9 / 8
    return compute_s * bandwidth / (2 * payload)


@pytest.mark.parametrize("solution, says", [
    (first_that_does_not_fit, "off by one"),
    (bottleneck_one_direction, "you counted one direction of the server's traffic"),
    (bottleneck_in_bytes, "you used the link speed as bytes per second"),
    (not_rounded, "return a whole number of workers"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_bottleneck_gets_its_diagnosis(solution, says):
    verdict = grading.grade("12.server_bottleneck", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)
