"""Lab 03 · Parameter server: the server's apply loop, with the staleness of every push recorded.

In-process (the server's arithmetic needs no ranks): the student's `apply_push(server, grad,
pulled_version)` replays a recorded sequence of pushes from three workers — under async, from a small
event simulation in which worker 3 is three times slower; under sync, rounds of one push per worker in
shuffled order. The same pushes go through the library's own `parameter_server.Server`; after every push
the student's version, staleness and parameters are compared with the server's, and the first difference
is named: which push, which worker, and the mistake it looks like.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

import torch

from ..architectures import parameter_server as ps
from .grading import Passed, Wrong, call_student, check_tensor, exercise

WORKERS = (1, 2, 3)
SECONDS_PER_GRADIENT = {1: 1.0, 2: 1.3, 3: 3.1}  # the async recording: worker 3 is the straggler
LR, DIM, PUSHES = 0.5, 6, 12
MODES = {"async": ps.MODES["async"], "sync": ps.MODES["sync"]}  # async first: its staleness varies


@dataclass(frozen=True)
class Push:
    """One recorded push, and what the library's server did with it."""

    worker: int
    pulled_version: int
    grad: torch.Tensor
    version: int  # the server's version after this push
    staleness: int  # its version_staleness, as the server recorded it
    before: torch.Tensor  # the parameters before this push
    after: torch.Tensor  # and after it


def start_params() -> torch.Tensor:
    return torch.randn(DIM, generator=torch.Generator().manual_seed(3))


def fresh_server(mode: str) -> dict:
    """What the student's function gets: the server's state as a dict."""
    return {"params": start_params(), "version": 0, "pending": [], "lr": LR, "workers": len(WORKERS), "mode": mode}


def recorded_pushes(mode: str, pushes: int = PUSHES, seed: int = 0) -> list[Push]:
    """Pushes as the library's Server applied them. Async: each worker pulls, computes for its
    SECONDS_PER_GRADIENT, pushes and pulls again, in event order; sync: every worker pulled round r's
    parameters (version r) and the round's pushes arrive in a shuffled order."""
    server = ps.Server(start_params(), list(WORKERS), ps.Config(staleness=MODES[mode], lr=LR), time.time())
    gen = torch.Generator().manual_seed(seed)
    recorded: list[Push] = []

    def feed(worker: int, clock: int, pulled: int) -> None:
        grad, before = torch.randn(DIM, generator=gen), server.params.clone()
        server.handle(time.time(), worker, [ps.PUSH, clock, pulled, 0], grad)
        server.close_round()
        recorded.append(Push(worker, pulled, grad, server.version, server.updates["version_staleness"][-1],
                             before, server.params.clone()))

    if mode == "sync":
        for r in range(pushes // len(WORKERS)):
            for k in torch.randperm(len(WORKERS), generator=gen).tolist():
                feed(WORKERS[k], r, r)
        return recorded
    due = [(SECONDS_PER_GRADIENT[w], w, 0) for w in WORKERS]  # (push time, worker, version it pulled)
    clocks = dict.fromkeys(WORKERS, 0)
    while len(recorded) < pushes:
        t, worker, pulled = heapq.heappop(due)
        feed(worker, clocks[worker], pulled)
        clocks[worker] += 1
        heapq.heappush(due, (t + SECONDS_PER_GRADIENT[worker], worker, server.version))
    return recorded


# -- what the check says about a wrong push -----------------------------------------------------------

def _as_int(x, what: str) -> int:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, int):
        raise Wrong(f"{what} should be an int, got {x!r}")
    return x


def _check_staleness(got: int, push: Push, where: str) -> None:
    if got == push.staleness:
        return
    should = f"it should be {push.staleness}"
    if push.staleness and got == -push.staleness:
        raise Wrong(f"{where}: staleness {got}, {should}: the sign is reversed — staleness is the server's "
                    "version now minus the version the gradient was computed on (never negative)")
    if got == push.staleness + 1:
        raise Wrong(f"{where}: staleness {got}, {should}: one too many — measure it when the push arrives, "
                    "before this push changes the version")
    if got == push.staleness - 1:
        raise Wrong(f"{where}: staleness {got}, {should}: one too few (off by one)")
    raise Wrong(f"{where}: staleness {got}, {should} (server version before the push minus pulled_version)")


def _check_version(got: int, server: dict, push: Push, before: int, position: str, where: str) -> None:
    if got != server["version"]:
        raise Wrong(f"{where}: you returned version {got} but server['version'] is {server['version']}: update "
                    "server['version'] and return it")
    if got == push.version:
        return
    if server["mode"] == "async" and got == before:
        raise Wrong(f"{where}: the version is still {got}: in async mode every applied push makes a new "
                    "version (server['version'] += 1)")
    if server["mode"] == "sync" and got > push.version:
        raise Wrong(f"{where}: the version went to {got} at {position}: sync mode applies nothing until every "
                    "worker has pushed, then the round's mean as one update (one new version per round)")
    if server["mode"] == "sync" and got == before:
        left = f" (server['pending'] still holds {len(server['pending'])} pushes: empty it once the round is " \
               "applied)" if server["pending"] else ""
        raise Wrong(f"{where}: {position} completes the round, but the version is still {got}: apply the "
                    f"round's mean and add 1 to the version{left}")
    raise Wrong(f"{where}: version {got}, should be {push.version}")


def _close(got, value: torch.Tensor) -> bool:
    return isinstance(got, torch.Tensor) and got.shape == value.shape and torch.allclose(got, value, atol=1e-6)


def _mistakes(push: Push, round_grads: list[torch.Tensor], mode: str, position: str) -> list[tuple]:
    """What the parameters would be after the usual mistakes at this push, with what to say."""
    p, g, n = push.before, push.grad, len(WORKERS)
    if mode == "async":
        return [(p - LR * g, f"you applied lr·grad: async scales each push by lr / workers = {LR}/{n}, so a round "
                             "of pushes moves the parameters as far as one sync step"),
                (p - g / n, "the learning rate is missing: params -= lr / workers * grad"),
                (p - g, "the learning rate is missing: params -= lr / workers * grad"),
                (p + LR / n * g, "you added the gradient: gradient descent subtracts it"),
                (p, "the parameters did not change: apply the push at once (params -= lr / workers * grad)")]
    mean = torch.stack(round_grads).mean(0)
    return [(p - LR * n * mean, "you summed the round's pushes: sync applies their mean"),
            (p - mean, "the learning rate is missing: params -= lr * mean of the round's pushes"),
            (p - LR * g, "you applied only the last push of the round: sync applies the mean of all of them"),
            (p + LR * mean, "you added the gradient: gradient descent subtracts it"),
            (p, f"{position} completes the round, but the parameters did not change: apply the mean of the round's "
                "pushes")]


def _check_params(got, push: Push, round_grads: list[torch.Tensor], mode: str, position: str, where: str) -> None:
    """Raise Wrong unless the parameters are the server's; name the mistake the values match."""
    if _close(got, push.after):
        return
    if not isinstance(got, torch.Tensor) or got.shape != push.after.shape:
        check_tensor(got, push.after, f"server['params'] after {where}")  # says the type or shape it should have
    if mode == "sync" and torch.equal(push.before, push.after):
        raise Wrong(f"{where}: the parameters changed at {position}: sync mode applies nothing before the round is "
                    "complete (every worker pushed), then the mean of its pushes")
    for value, why in _mistakes(push, round_grads, mode, position):
        if _close(got, value):
            raise Wrong(f"{where}: {why}")
    check_tensor(got, push.after, f"server['params'] after {where}")


# -- the exercise -------------------------------------------------------------------------------------

def replay(fn, mode: str) -> list[int]:
    """Feed the recorded pushes to the student's function one by one; stop at the first difference.
    Returns the staleness it gave each push."""
    server, recorded, given = fresh_server(mode), recorded_pushes(mode), []
    for i, push in enumerate(recorded):
        before = recorded[i - 1].version if i else 0
        in_round = i % len(WORKERS) + 1
        position = f"push {in_round} of the round's {len(WORKERS)}"
        where = (f"{mode} push {i + 1} (worker {push.worker}, gradient computed on version {push.pulled_version}, "
                 f"server at version {before})")
        out = call_student(fn, server, push.grad.clone(), push.pulled_version)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise Wrong(f"return (version, staleness), a tuple of two ints; got {out!r}")
        version, staleness = _as_int(out[0], "version"), _as_int(out[1], "staleness")
        _check_staleness(staleness, push, where)
        _check_version(version, server, push, before, position, where)
        round_grads = [p.grad for p in recorded[i - in_round + 1:i + 1]]
        _check_params(server["params"], push, round_grads, mode, position, where)
        given.append(staleness)
    return given


@exercise("03.apply_push", "The server's apply loop, with staleness recorded")
def apply_push(fn) -> Passed:
    measured = {}
    for mode in MODES:
        given = replay(fn, mode)
        if mode == "async":
            workers = [p.worker for p in recorded_pushes(mode)]
            means = {w: sum(s for s, v in zip(given, workers) if v == w) / workers.count(w) for w in WORKERS}
            measured["async staleness, mean per worker"] = ", ".join(f"worker {w}: {m:.2f}" for w, m in means.items()) \
                + " (worker 3 is the slow one)"
        else:
            measured["sync staleness"] = f"max {max(given)} over {len(given)} pushes, {len(given) // 3} versions"
    return Passed(f"{PUSHES} async and {PUSHES} sync pushes: version, staleness and parameters equal to the library's "
                  "parameter_server.Server after every push", measured)
