"""Faults between the store's replicas, on the messages it already sends: partitions, loss, delay, pauses.

A `Schedule` is data: events at seconds after the workload's start, the same on every rank (all ranks share
one clock here), and a seed, so a run is reproducible up to the operating system's timing:

    Schedule("partition", (Event(0.3, "partition", groups=((0, 1), (2,))), Event(0.9, "heal")))

- partition: a message between two groups is lost (both ways), as when a switch fails;
- drop: each message is lost with probability `fraction`;
- delay: each message waits a random 0..`ms` milliseconds (one-way messages overtake each other: reordering);
- pause: `rank` stops for `seconds` (a garbage-collection or VM pause): it neither serves nor asks;
- heal: back to a perfect network (a pause already started runs its course).

`Faults` is one rank's view of the schedule: `fate(src, dst)` says, for one message, lost (None) or after
how many seconds it leaves; `pause_left(rank)` how long that rank stays frozen.

`NetworkControl` is the live version, for a notebook's panel: faults ordered by hand while the workload
runs, written to a file in a private folder that every rank's `LiveFaults` reads message by message.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field, replace

KINDS = ("partition", "drop", "delay", "pause", "heal")


@dataclass(frozen=True)
class Event:
    """One change of the network at `at` seconds after the start."""

    at: float
    kind: str
    groups: tuple = ()  # partition: tuples of ranks; a rank in no group is alone
    fraction: float = 0.0  # drop
    ms: float = 0.0  # delay
    rank: int = -1  # pause
    seconds: float = 0.0  # pause

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"an event's kind must be one of {KINDS}, got {self.kind!r}")
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"fraction must be between 0 and 1, got {self.fraction!r}")


@dataclass(frozen=True)
class Schedule:
    """A named, seeded list of events (see the module docstring)."""

    name: str
    events: tuple[Event, ...] = ()
    seed: int = 0

    def faults(self, rank: int, t0: float) -> Faults:
        """Rank `rank`'s view of this schedule, its clock started at `t0`."""
        return Faults(self, rank, t0)

    def describe(self) -> str:
        said = {"partition": lambda e: "partition " + " | ".join(",".join(map(str, g)) for g in e.groups),
                "drop": lambda e: f"drop {e.fraction:.0%}", "delay": lambda e: f"delay up to {e.ms:.0f} ms",
                "pause": lambda e: f"pause rank {e.rank} for {1000 * e.seconds:.0f} ms", "heal": lambda e: "heal"}
        return "; ".join(f"{1000 * e.at:.0f} ms: {said[e.kind](e)}" for e in self.events) or "a perfect network"


def partition(groups, start: float = 0.25, end: float = 0.85) -> Schedule:
    """Split the ranks into `groups` from `start` to `end` seconds."""
    groups = tuple(tuple(g) for g in groups)
    name = "partition " + " | ".join(",".join(map(str, g)) for g in groups)
    return Schedule(name, (Event(start, "partition", groups=groups), Event(end, "heal")))


def lossy(fraction: float, start: float = 0.0, end: float = 0.85, seed: int = 0) -> Schedule:
    return Schedule(f"drop {fraction:.0%}", (Event(start, "drop", fraction=fraction), Event(end, "heal")), seed)


def delayed(ms: float, start: float = 0.0, end: float = 0.85, seed: int = 0) -> Schedule:
    return Schedule(f"delay {ms:.0f} ms", (Event(start, "delay", ms=ms), Event(end, "heal")), seed)


def paused(rank: int, seconds: float, start: float = 0.25) -> Schedule:
    return Schedule(f"pause rank {rank}", (Event(start, "pause", rank=rank, seconds=seconds),))


NONE = Schedule("none")
PERFECT = {"groups": (), "fraction": 0.0, "ms": 0.0, "paused": {}}


def after(state: dict, event: Event, when: float) -> dict:
    """The network once `event` has happened at wall-clock time `when`."""
    state = {**state, "paused": dict(state["paused"])}
    if event.kind == "heal":
        state.update(groups=(), fraction=0.0, ms=0.0)
    elif event.kind == "partition":
        state["groups"] = event.groups
    elif event.kind == "drop":
        state["fraction"] = event.fraction
    elif event.kind == "delay":
        state["ms"] = event.ms
    elif event.kind == "pause":
        state["paused"][event.rank] = when + event.seconds
    return state


@dataclass
class Faults:
    """One rank's view of a schedule, from the common start time `t0`."""

    schedule: Schedule
    rank: int
    t0: float
    lost: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self):
        self._rng = random.Random(self.schedule.seed * 7919 + self.rank)

    def state(self, now: float | None = None) -> dict:
        """The network as it is now: {"groups", "fraction", "ms", "paused": {rank: until}}."""
        elapsed = (time.time() if now is None else now) - self.t0
        state = PERFECT
        for event in self.schedule.events:
            if event.at > elapsed:
                break
            state = after(state, event, self.t0 + event.at)
        return state

    def apart(self, src: int, dst: int, groups: tuple) -> bool:
        """Whether a partition separates src from dst (a rank in no group is on a side of its own)."""
        if not groups:
            return False
        side = {r: i for i, g in enumerate(groups) for r in g}
        return side.get(src, -1 - src) != side.get(dst, -1 - dst)

    def fate(self, src: int, dst: int) -> float | None:
        """For one message from src to dst: None if lost, else the seconds it waits before it leaves."""
        state = self.state()
        if self.apart(src, dst, state["groups"]) or self._rng.random() < state["fraction"]:
            self.lost += 1
            return None
        return self._rng.uniform(0, state["ms"]) / 1000

    def pause_left(self, rank: int) -> float:
        """Seconds `rank` stays paused from now (0 when it is running)."""
        return max(0.0, self.state()["paused"].get(rank, 0.0) - time.time())


class NetworkControl:
    """Faults ordered by hand while a workload runs (the notebook's panel), for every rank at once.

    The network's state lives in a file of a private (0700) folder, replaced whole at each order, so a rank
    reads either the old state or the new one. Pass the control as the workload's `schedule`: each rank then
    reads the file for every message it sends. Every order is kept with its wall-clock time, so the run's
    figure can shade what was done (`schedule(t0)`)."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="distlab-network-")
        self.path = os.path.join(self.folder, "network.json")
        self.orders: list[Event] = []
        self._state = PERFECT
        self._write()

    def order(self, kind: str, **fields) -> None:
        """Change the network now: `kind` and the fields of an `Event` (groups, fraction, ms, rank, seconds)."""
        event = Event(time.time(), kind, **fields)
        self._state = after(self._state, event, event.at)
        self.orders.append(event)
        self._write()

    def _write(self) -> None:
        temporary = self.path + ".new"
        with open(temporary, "w") as file:
            json.dump(self._state, file)
        os.replace(temporary, self.path)

    def faults(self, rank: int, t0: float) -> LiveFaults:
        return LiveFaults(NONE, rank, t0, path=self.path)

    def schedule(self, t0: float) -> Schedule:
        """The orders given so far as a Schedule whose clock starts at `t0` (a run's start)."""
        return Schedule("faults ordered by hand", tuple(replace(e, at=e.at - t0) for e in self.orders))


@dataclass
class LiveFaults(Faults):
    """One rank's view of a NetworkControl: the state as the notebook last wrote it."""

    path: str = ""
    _seen: tuple = field(default=(), init=False, repr=False)  # (inode, mtime) of the file last parsed
    _state: dict = field(default_factory=lambda: PERFECT, init=False, repr=False)

    def state(self, now: float | None = None) -> dict:
        """Parsed again only when the control has replaced the file (each order is a new inode)."""
        stamp = os.stat(self.path)
        if (stamp.st_ino, stamp.st_mtime_ns) != self._seen:
            with open(self.path) as file:
                raw = json.load(file)
            self._seen = (stamp.st_ino, stamp.st_mtime_ns)
            self._state = {"groups": tuple(tuple(g) for g in raw["groups"]), "fraction": raw["fraction"],
                           "ms": raw["ms"], "paused": {int(rank): until for rank, until in raw["paused"].items()}}
        return self._state
