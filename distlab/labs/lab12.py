"""Lab 12 · Choosing an architecture: seconds of communication per step from link speed and model size,
and how many workers one parameter server can feed before its link is the bottleneck.

In-process: the student's answer is compared with what the check computes from the course's own cost
model (`compare.busiest_bytes_per_sync`: the ring all-reduce's 2(N-1)/N·S per rank, the server's one
copy per worker), on links of 1 to 100 Gbit/s and models of a few MiB to hundreds. A wrong number is
divided by the right one, and the ratio, the same in every case or varying with N, names the slip: bits
for bytes, MB for MiB, a missing 2(N-1)/N, one direction of the server's traffic, N workers where there
are N - 1 (the worker count: the answer the slip would give, or off by one).
"""

from __future__ import annotations

import itertools
import math

from ..architectures.compare import busiest_bytes_per_sync
from .grading import Passed, Wrong, call_student, exercise

MIB, GIGABIT = 2 ** 20, 1e9  # bytes in a MiB; bits per second in a Gbit/s
STEP_CASES = ((100, 10, 8), (40, 25, 16), (500, 100, 4), (3, 1, 3))  # (model MiB, link Gbit/s, machines)
BOTTLENECK_CASES = ((100, 10, 1.0), (20, 25, 0.5), (4, 100, 0.05))  # (model MiB, link Gbit/s, compute s)
KEYS = ("all-reduce", "PS sync")


def payload_bytes(model_mib: float) -> float:
    return model_mib * MIB


def link_bytes_per_second(link_gbps: float) -> float:
    return link_gbps * GIGABIT / 8


def step_seconds(model_mib: float, link_gbps: float, machines: int) -> dict[str, float]:
    """The cost model's seconds per step on the busiest link. All-reduce: a rank sends 2(N-1)/N·S while it
    receives as much (full duplex: the two overlap). Sync PS, one of the N machines serving: the N-1
    pushes come in, then N-1 copies of the new model go out, one after the other."""
    payload, bandwidth = payload_bytes(model_mib), link_bytes_per_second(link_gbps)
    replies = busiest_bytes_per_sync("PS sync", machines, payload)  # one model out per worker...
    pushes = replies  # ...after one gradient in per worker
    return {"all-reduce": busiest_bytes_per_sync("all-reduce", machines, payload) / bandwidth,
            "PS sync": (pushes + replies) / bandwidth}


# -- the usual slips, as factors on the right answer --------------------------------------------------

UNIT_SLIPS = {  # factor on the seconds -> the mistake
    1 / 8: "you used the link speed as bytes per second: Gbit/s counts bits, so divide by 8 (10 Gbit/s = "
           "1.25·10^9 bytes/s)",
    8: "you counted the model in bits against a link in bytes per second (or multiplied by 8 where you should "
       "divide): S in bytes over link_gbps·10^9/8 bytes/s",
    1e6 / MIB: "you took a MiB as 10^6 bytes: a MiB is 2^20 = 1,048,576 bytes (an MB is 10^6)",
    GIGABIT / 2 ** 30: "you took a Gbit as 2^30 bits: link speeds are decimal, 1 Gbit/s = 10^9 bits/s",
    1000: "you returned milliseconds: the answer is in seconds",
}


FORMULA_SLIPS = {  # the mistake -> its factor on the seconds, for N machines
    "all-reduce": {
        "you left out the ring's 2(N-1)/N: each rank sends 2(N-1)/N·S per step (reduce-scatter, then "
        "all-gather), not S": lambda n: n / (2 * (n - 1)),
        "you used 2·S: the ring sends 2(N-1)/N·S per rank, a little under 2S": lambda n: n / (n - 1),
        "you counted only the reduce-scatter, (N-1)/N·S: the all-gather sends as much again": lambda n: 0.5,
        "(N-1)·S is what the naive all-reduce's root sends; a ring rank sends 2(N-1)/N·S": lambda n: n / 2,
        "you added what a rank receives to what it sends: in the ring they overlap (each rank sends to its right "
        "while it receives from its left), so count one direction": lambda n: 2.0,
    },
    "PS sync": {
        "you counted one direction of the server's traffic: in a sync step the N-1 pushes come in, then N-1 "
        "copies of the new model go out, one after the other: 2(N-1)·S through the server's link": lambda n: 0.5,
        "you counted N workers: one of the N machines is the server, so N-1 workers": lambda n: n / (n - 1),
        "you counted one worker's traffic: the server's link carries every worker's push and pull":
            lambda n: 1 / (n - 1),
        "you used the ring's 2(N-1)/N·S for the server: it sends a whole copy to each of the N-1 workers and "
        "receives one from each": lambda n: 1 / n,
    },
}


def _explain(ratios: list[tuple[int, float]], key: str) -> str | None:
    """The slip (a formula slip, a unit slip, or one of each) whose factor matches the ratio in every case;
    ratios are (machines, yours / the cost model's)."""
    formulas = [(None, lambda n: 1.0), *FORMULA_SLIPS[key].items()]
    units = [(None, 1.0), *((says, factor) for factor, says in UNIT_SLIPS.items())]
    for (formula_says, formula), (unit_says, unit) in itertools.product(formulas, units):
        if (formula_says or unit_says) and all(math.isclose(r, unit * formula(n), rel_tol=1e-4) for n, r in ratios):
            return "; and ".join(says for says in (formula_says, unit_says) if says)
    return None


def _as_seconds(got, case: tuple) -> dict[str, float]:
    if not isinstance(got, dict) or set(got) != set(KEYS):
        raise Wrong(f"return a dict with the keys {list(KEYS)}, got {got!r} for {case}")
    for key, value in got.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise Wrong(f"{key!r} should be a positive number of seconds, got {value!r} for {case}")
    return {key: float(value) for key, value in got.items()}


def _describe(case: tuple) -> str:
    model, link, n = case
    return f"{model} MiB model, {link} Gbit/s links, {n} machines"


@exercise("12.choose_architecture", "Seconds of communication per step: all-reduce or a parameter server")
def choose_architecture(fn) -> Passed:
    answers = [(case, _as_seconds(call_student(fn, *case), case), step_seconds(*case)) for case in STEP_CASES]
    for key in KEYS:
        if all(math.isclose(got[key], model[key], rel_tol=1e-3) for _, got, model in answers):
            continue
        ratios = [(case[2], got[key] / model[key]) for case, got, model in answers]
        case, got, model = next(a for a in answers if not math.isclose(a[1][key], a[2][key], rel_tol=1e-3))
        detail = f"{key} for a {_describe(case)}: yours {got[key]:.4g} s, the cost model's {model[key]:.4g} s"
        said = _explain(ratios, key)
        if said:
            raise Wrong(f"{key}: {said}", detail)
        spread = sorted({round(r, 3) for _, r in ratios})
        raise Wrong(f"{key}: your seconds are {spread} times the cost model's in the {len(ratios)} cases", detail)
    case, got, model = answers[0]
    return Passed(f"both architectures right in {len(STEP_CASES)} cases (1 to 100 Gbit/s, 3 to 16 machines)",
                  {_describe(case): f"all-reduce {got['all-reduce']:.3f} s, PS sync {got['PS sync']:.3f} s per step "
                                    f"(cost model {model['all-reduce']:.3f} s and {model['PS sync']:.3f} s)",
                   "choose": f"all-reduce: the server's link carries {got['PS sync'] / got['all-reduce']:.0f}× a "
                             "ring rank's bytes (N×: shard the server to scale it)"})


# -- how many workers one server can serve ------------------------------------------------------------

def server_link_seconds(model_mib: float, link_gbps: float, workers: int) -> float:
    """Seconds the sync server's link is busy per step with `workers` workers: linear in them, so the cost
    model's two-worker figure (N = 3 machines, the least it takes) halved, times the workers."""
    return step_seconds(model_mib, link_gbps, 3)["PS sync"] / 2 * workers


def server_bottleneck_workers(model_mib: float, link_gbps: float, compute_s: float, factor: float = 1.0) -> int:
    """The most workers whose sync step's communication (times `factor`, to model a slip) still takes no
    longer than the step's computation: beyond it the server's link is the bottleneck."""
    workers = 0
    while factor * server_link_seconds(model_mib, link_gbps, workers + 1) <= compute_s:
        workers += 1
    return workers


@exercise("12.server_bottleneck", "How many workers before the server's link is the bottleneck")
def server_bottleneck(fn) -> Passed:
    answers = [call_student(fn, *case) for case in BOTTLENECK_CASES]
    for got in answers:
        if not isinstance(got, int) or isinstance(got, bool):
            raise Wrong(f"return a whole number of workers (an int: round down), got {got!r}")
    rights = [server_bottleneck_workers(*case) for case in BOTTLENECK_CASES]
    if answers == rights:
        return _bottleneck_passed()
    got, right, (model, link, compute) = next(a for a in zip(answers, rights, BOTTLENECK_CASES) if a[0] != a[1])
    detail = (f"{model} MiB model, {link} Gbit/s, {compute} s of computation per step: yours {got}, should be {right} "
              f"(the server's link takes {server_link_seconds(model, link, right):.4g} s with {right} workers, "
              f"{server_link_seconds(model, link, right + 1):.4g} s with {right + 1})")
    if all(a == r + 1 for a, r in zip(answers, rights)):
        raise Wrong("off by one: return the largest number of workers whose communication still fits in the "
                    "computation time, not the first that does not", detail)
    one_way = next(says for says, formula in FORMULA_SLIPS["PS sync"].items() if formula(4) == 0.5)
    for factor, says in {**UNIT_SLIPS, 0.5: one_way}.items():
        if answers == [server_bottleneck_workers(*case, factor=factor) for case in BOTTLENECK_CASES]:
            raise Wrong(says, detail)
    raise Wrong("your number of workers is not the cost model's", detail)


def _bottleneck_passed() -> Passed:
    model, link, compute = BOTTLENECK_CASES[0]
    workers = server_bottleneck_workers(*BOTTLENECK_CASES[0])
    ring = step_seconds(model, link, 64)["all-reduce"]
    return Passed(f"right in {len(BOTTLENECK_CASES)} cases: one server's link carries 2·W·S per step, so it serves "
                  "about compute·bandwidth / (2·S) workers",
                  {f"{model} MiB, {link} Gbit/s, {compute} s per step":
                       f"{workers} workers; all-reduce has no such limit ({ring:.3f} s per step on 64 machines)"})
