"""Each consistency mode under each fault schedule, on real ranks: what stayed available, what went stale.

One workload per (mode, schedule) on three ranks, for `duration` seconds with short reply timeouts, so a
fault costs a few timeouts rather than a stall. Every history is then judged twice: by the measures here
(availability: the share of operations answered; stale reads, by checker.py) and by the linearizability
search (linearizability.py). `fault_table` puts them in one pandas table (pandas only when asked).
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass

from ..launch import launch
from ..ranks import world_sizes
from . import checker, linearizability
from .faults import NONE, NetworkControl, Schedule, lossy, partition, paused
from .store import History, Op, run_workload

MODES = {  # label -> the store's knobs
    "strong": {"mode": "strong"},
    "weak": {"mode": "weak"},
    "eventual": {"mode": "eventual"},
    "quorum R=2 W=2": {"mode": "quorum", "quorum": (2, 2)},
    "quorum R=1 W=1": {"mode": "quorum", "quorum": (1, 1)},
}
MINORITY = (2,)
SCHEDULES = {
    "none": NONE,
    "partition": partition([(0, 1), MINORITY], start=0.25, end=0.85),
    "drop 30%": lossy(0.3, start=0.0, end=0.85, seed=1),
    "pause rank 0": paused(0, seconds=0.5, start=0.25),
}
WORLD = 3
SETTLE = {"eventual": 3.0, "weak": 3.0}  # seconds to wait for replicas to agree after the operations; else 0.3


def _runs_on(world_size: int, schedule=NONE, quorum: tuple = (2, 2), **_) -> bool:
    """Three replicas under faults (the schedules and the live panel name ranks 0, 1 | 2); any N on a perfect
    network, as long as a quorum fits in it."""
    perfect = isinstance(schedule, Schedule) and not schedule.events
    return world_size == WORLD or (perfect and world_size >= max(2, *quorum))


@world_sizes(_runs_on, "the fault schedules and the live panel name the ranks of three replicas ({0, 1} | {2}, "
             "pause rank 0) and the quorums are sized for N = 3; on a perfect network the store runs on any N "
             "that holds a quorum")
def faulted_workload(ctx, **options) -> dict:
    """store.run_workload, on the world sizes this module's experiments are made for."""
    return run_workload(ctx, **options)


@dataclass
class FaultRun:
    """One workload's record: the mode's label, the schedule, the history and the common start time."""

    label: str
    schedule: Schedule
    history: History
    t0: float
    lost: int  # messages lost to the faults
    converged: bool

    def window(self) -> tuple[float, float]:
        """(start, end) seconds of the schedule's faults (0, 0 on a perfect network)."""
        events = self.schedule.events
        if not events:
            return 0.0, 0.0
        pauses = [e.at + e.seconds for e in events if e.kind == "pause"]
        return events[0].at, max(pauses + [e.at for e in events if e.kind == "heal"] + [events[0].at])

    def during(self, ops: list[Op] | None = None, margin: float = 0.02) -> list[Op]:
        """Operations invoked while the faults held (not within `margin` s of their start or end)."""
        start, end = self.window()
        ops = self.history.ops if ops is None else ops
        return [op for op in ops if start + margin <= op.invoke - self.t0 <= end - margin]


def run_under_faults(label: str, schedule: Schedule = NONE, duration: float = 1.1, reply_timeout: float = 0.15,
                     seed: int = 0, launch_timeout: float = 90, runs_root: str | None = None, **knobs) -> FaultRun:
    """The workload of store.run_workload on three ranks, in mode `label` (a key of MODES), under `schedule`."""
    run = _launch(label, schedule, duration, reply_timeout, seed, launch_timeout, runs_root, True, knobs)
    return fault_run(label, run, schedule)


def start_under_control(label: str, control: NetworkControl, duration: float = 8.0, reply_timeout: float = 0.15,
                        seed: int = 0, launch_timeout: float = 120, **knobs):
    """The same workload, started without waiting (a dl.Run), its network ordered live through `control`
    (the notebook's panel); once `run.wait()` returns, `fault_run(label, run, control)`."""
    return _launch(label, control, duration, reply_timeout, seed, launch_timeout, None, False, knobs)


def _launch(label, schedule, duration, reply_timeout, seed, launch_timeout, runs_root, block, knobs):
    if label not in MODES:
        raise ValueError(f"label must be one of {sorted(MODES)}, got {label!r}")
    mode = MODES[label]["mode"]
    work = functools.partial(faulted_workload, timeout=reply_timeout)  # launch's own `timeout` bounds the launch
    options = {"ops": 10_000, "think": 0.004, "settle_timeout": SETTLE.get(mode, 0.3), **MODES[label], **knobs}
    return launch(work, world_size=WORLD, timeout=launch_timeout, quiet=True, runs_root=runs_root, block=block,
                  schedule=schedule, duration=duration, seed=seed, **options)


def fault_run(label: str, run, schedule: Schedule | NetworkControl) -> FaultRun:
    """A finished launch of the workload as a FaultRun (a live control's orders become its schedule)."""
    history = History.from_results(MODES[label]["mode"], run.results)
    t0 = run.results[0]["t0"]
    if isinstance(schedule, NetworkControl):
        schedule = schedule.schedule(t0)
    lost = sum(sum(r["lost"].values()) for r in run.results)
    return FaultRun(label, schedule, history, t0, lost, all(r["converged"] for r in run.results))


def _share_answered(ops: list[Op]) -> float | None:
    return sum(op.outcome == "ok" for op in ops) / len(ops) if ops else None


def measure(run: FaultRun) -> dict:
    """One row: availability overall, during the faults and on the minority side; stale reads; the verdict."""
    ops, during = run.history.ops, run.during()
    verdict = linearizability.check(ops)
    answered = checker.answered(ops)
    return {
        "mode": run.label, "schedule": run.schedule.name, "operations": len(ops),
        "availability": _share_answered(ops), "availability_during_fault": _share_answered(during),
        "minority_availability": _share_answered([op for op in during if op.rank in MINORITY]),
        "stale_read_rate": checker.stale_read_rate(ops), "linearizable": verdict.result,
        "checker_steps": verdict.steps, "converged": run.converged,
        "messages_per_op": sum(sum(m.values()) for m in run.history.messages) / max(1, len(ops)),
        "lost_messages": run.lost,
        "median_ms": 1000 * statistics.median(op.complete - op.invoke for op in answered) if answered else None,
    }


def sweep(labels=tuple(MODES), schedules=tuple(SCHEDULES), progress=None, **knobs) -> list[FaultRun]:
    """Every mode under every schedule (names from MODES and SCHEDULES); `progress(label, schedule)` is
    called before each run (a notebook's progress bar)."""
    runs = []
    for name in schedules:
        for label in labels:
            if progress is not None:
                progress(label, name)
            runs.append(run_under_faults(label, SCHEDULES[name], **knobs))
    return runs


def fault_table(runs: list[FaultRun]):
    """The measures of every run, one row per (mode, schedule), as a pandas DataFrame."""
    import pandas as pd

    return pd.DataFrame([measure(run) for run in runs]).set_index(["schedule", "mode"])


def survivors(run: FaultRun, groups=((0, 1), MINORITY)) -> list[dict]:
    """Last writer wins, key by key: the last write acknowledged on each side, and the one every replica holds
    in the end (the larger (time, rank) stamp): the other side's writes are lost. All the run's writes count,
    not only those inside the partition: a write begun as the partition heals can still be the last."""
    acknowledged = [op for op in run.history.ops if op.kind == "write" and op.outcome == "ok"]
    finals = run.history.finals[0]
    rows = []
    for key in sorted({op.key for op in acknowledged}):
        row = {"key": key}
        for group in groups:
            mine = [op for op in acknowledged if op.key == key and op.rank in group]
            last = max(mine, key=lambda op: op.version, default=None)
            row[f"last write, ranks {','.join(map(str, group))}"] = None if last is None else last.value
        row["survivor"] = finals.get(key, (None,))[0]
        rows.append(row)
    return rows
