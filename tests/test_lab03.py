"""Lab 03: typical wrong answers get the diagnosis that names their mistake (the reference solution passes
in test_labs.py)."""

import pytest

from distlab.labs import grading


def _apply(server, grad, scale):
    """The update itself, right in both modes; the wrong answers below vary the rest."""
    if server["mode"] == "async":
        server["params"] -= scale * server["lr"] / server["workers"] * grad
        server["version"] += 1
        return
    server["pending"].append(grad)
    if len(server["pending"]) == server["workers"]:
        server["params"] -= scale * server["lr"] * sum(server["pending"]) / server["workers"]
        server["pending"].clear()
        server["version"] += 1


def staleness_reversed(server, grad, pulled_version):
    staleness = pulled_version - server["version"]
    _apply(server, grad, 1.0)
    return server["version"], staleness


def staleness_after_the_update(server, grad, pulled_version):
    _apply(server, grad, 1.0)
    return server["version"], server["version"] - pulled_version


def no_learning_rate(server, grad, pulled_version):
    staleness = server["version"] - pulled_version
    _apply(server, grad, 1 / server["lr"])
    return server["version"], staleness


def async_without_dividing(server, grad, pulled_version):
    staleness = server["version"] - pulled_version
    _apply(server, grad, server["workers"] if server["mode"] == "async" else 1.0)
    return server["version"], staleness


def version_never_moves(server, grad, pulled_version):
    staleness = server["version"] - pulled_version
    server["params"] -= server["lr"] / server["workers"] * grad
    return server["version"], staleness


def sync_applies_on_arrival(server, grad, pulled_version):
    """Treats sync like async: each push applied before the round is complete."""
    staleness = server["version"] - pulled_version
    server["params"] -= server["lr"] / server["workers"] * grad
    server["version"] += 1
    return server["version"], staleness


def sync_params_early_version_right(server, grad, pulled_version):
    """Sync that steps the parameters at every push but counts versions per round."""
    staleness = server["version"] - pulled_version
    server["params"] -= server["lr"] / server["workers"] * grad
    if server["mode"] == "async":
        server["version"] += 1
    else:
        server["pending"].append(grad)
        if len(server["pending"]) == server["workers"]:
            server["pending"].clear()
            server["version"] += 1
    return server["version"], staleness


def sync_sums(server, grad, pulled_version):
    staleness = server["version"] - pulled_version
    _apply(server, grad, server["workers"] if server["mode"] == "sync" else 1.0)
    return server["version"], staleness


def sync_keeps_pending(server, grad, pulled_version):
    """Never empties the round: from the second round on, the round never completes."""
    staleness = server["version"] - pulled_version
    if server["mode"] == "async":
        _apply(server, grad, 1.0)
    else:
        server["pending"].append(grad)
        if len(server["pending"]) == server["workers"]:
            server["params"] -= server["lr"] * sum(server["pending"]) / server["workers"]
            server["version"] += 1
    return server["version"], staleness


def returns_only_the_version(server, grad, pulled_version):
    _apply(server, grad, 1.0)
    return server["version"]


@pytest.mark.parametrize("solution, says", [
    (staleness_reversed, "the sign is reversed"),
    (staleness_after_the_update, "one too many — measure it when the push arrives"),
    (no_learning_rate, "the learning rate is missing"),
    (async_without_dividing, "async scales each push by lr / workers"),
    (version_never_moves, "every applied push makes a new version"),
    (sync_applies_on_arrival, "sync mode applies nothing until every worker has pushed"),
    (sync_params_early_version_right, "sync mode applies nothing before the round is complete"),
    (sync_sums, "you summed the round's pushes"),
    (sync_keeps_pending, "server['pending'] still holds 6 pushes: empty it"),
    (returns_only_the_version, "return (version, staleness)"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_apply_loop_gets_its_diagnosis(solution, says):
    verdict = grading.grade("03.apply_push", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_the_diagnosis_names_the_push_and_the_worker():
    verdict = grading.grade("03.apply_push", staleness_after_the_update)
    assert verdict.summary.startswith("async push 1 (worker 1, gradient computed on version 0, server at version 0)")
    verdict = grading.grade("03.apply_push", sync_applies_on_arrival)
    assert "sync push 1 (worker 3" in verdict.summary and "push 1 of the round's 3" in verdict.summary, str(verdict)
