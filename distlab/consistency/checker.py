"""Checking a recorded history of the replicated store (distlab/consistency/store.py), Jepsen-style.

Every write stores a unique value and gets a version; versions of one key are totally ordered. On
that record:

- `linearizability_violations`: the checks a linearizable register passes (Herlihy & Wing 1990): a read
  returns a value that was written (or the initial one), never from a write that began after the read
  ended, never older than a write that completed before the read began (a stale read), never older
  than what an earlier read already returned; writes get versions in their real-time order.
- `convergence_problems`: once writes stop, every replica holds the same value for every key, and it
  is the winning write (the largest version).
Operations the store could not complete (Op.outcome "failed" or "unknown") are left out: these checks are
about what the store answered. distlab/consistency/linearizability.py searches for a linearization instead,
and weighs the unknown outcomes.

- `convergence_time`: seconds from the last write's completion until the last replica applied the
  final version of every key.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass

from .store import INITIAL, History, Op


@dataclass(frozen=True)
class Violation:
    kind: str  # "unknown value", "future read", "stale read", "read inversion", "write order"
    op: Op
    detail: str


def answered(ops: list[Op]) -> list[Op]:
    """The operations the store completed."""
    return [op for op in ops if op.outcome == "ok"]


def _by_key(ops: list[Op], kind: str) -> dict[str, list[Op]]:
    grouped = defaultdict(list)
    for op in answered(ops):
        if op.kind == kind:
            grouped[op.key].append(op)
    return grouped


def _latest_completed(writes: list[Op], before: float) -> tuple:
    """The largest version among writes that completed before time `before`."""
    return max((w.version for w in writes if w.complete < before), default=INITIAL)


def stale_reads(ops: list[Op]) -> list[Op]:
    """Reads that returned an older version than a write of the same key completed before the read began."""
    writes = _by_key(ops, "write")
    return [r for r in answered(ops) if r.kind == "read" and r.version < _latest_completed(writes[r.key], r.invoke)]


def stale_read_rate(ops: list[Op]) -> float:
    """Stale reads as a share of the reads answered."""
    reads = sum(op.kind == "read" for op in answered(ops))
    return len(stale_reads(ops)) / reads if reads else 0.0


def _read_violations(read: Op, writes: list[Op], earlier_reads: list[Op]) -> list[Violation]:
    source = {w.version: w for w in writes}.get(read.version)
    if read.version != INITIAL and (source is None or source.value != read.value):
        return [Violation("unknown value", read, f"{read.value!r} @ {read.version} was never written")]
    if read.version == INITIAL and read.value is not None:
        return [Violation("unknown value", read, f"{read.value!r} with the initial version")]
    found = []
    if source is not None and source.invoke > read.complete:
        found.append(Violation("future read", read, f"its write began at {source.invoke:.6f}, after the read ended"))
    latest = _latest_completed(writes, read.invoke)
    seen = max((r.version for r in earlier_reads if r.complete < read.invoke), default=INITIAL)
    if read.version < latest:
        found.append(Violation("stale read", read, f"returned {read.version}, but {latest} had completed"))
    elif read.version < seen:  # not older than any completed write, but older than an earlier read saw
        found.append(Violation("read inversion", read, f"returned {read.version} after a read returned {seen}"))
    return found


def linearizability_violations(ops: list[Op]) -> list[Violation]:
    """Everything in the history a linearizable register could not have produced (empty: it passes)."""
    writes, reads = _by_key(ops, "write"), _by_key(ops, "read")
    found = []
    for key_writes in writes.values():
        for w in key_writes:
            before = _latest_completed(key_writes, w.invoke)
            if w.version <= before:
                found.append(Violation("write order", w, f"got {w.version} after {before} had completed"))
    for key, key_reads in reads.items():
        for read in key_reads:
            found.extend(_read_violations(read, writes.get(key, []), key_reads))
    return found


def convergence_problems(history: History) -> list[str]:
    """Why the replicas have not converged to the winning writes (empty: they have)."""
    problems = []
    for key, key_writes in _by_key(history.ops, "write").items():
        winner = max(key_writes, key=lambda w: w.version)
        for rank, final in enumerate(history.finals):
            if final.get(key) != (winner.value, winner.version):
                problems.append(f"rank {rank} holds {final.get(key)} for {key}, "
                                f"not the winning write {(winner.value, winner.version)}")
    return problems


def convergence_time(history: History) -> float | None:
    """Seconds from the last write's completion until every replica held its final state (None if never)."""
    if convergence_problems(history):
        return None
    last_write = max((op.complete for op in history.ops if op.kind == "write"), default=None)
    if last_write is None:
        return 0.0
    reached = [t for applied, final in zip(history.applied, history.finals)
               for t, key, version in applied if final[key][1] == version]
    return max(0.0, max(reached) - last_write)


def summarize(history: History) -> dict:
    """One row for the comparison of modes: staleness, violations, convergence, messages, latency."""
    reads = [op for op in history.ops if op.kind == "read"]
    writes = [op for op in history.ops if op.kind == "write"]
    kinds = Counter()
    for per_rank in history.messages:
        kinds.update(per_rank)
    messages = sum(kinds.values())

    def median_ms(ops):
        return 1000 * statistics.median(op.complete - op.invoke for op in ops) if ops else 0.0

    return {
        "mode": history.mode, "reads": len(reads), "writes": len(writes),
        "stale_reads": len(stale_reads(history.ops)), "stale_read_rate": stale_read_rate(history.ops),
        "violations": len(linearizability_violations(history.ops)),
        "converged": not convergence_problems(history), "convergence_s": convergence_time(history),
        "messages": messages, "messages_per_op": messages / max(1, len(history.ops)),
        "read_ms": median_ms(reads), "write_ms": median_ms(writes), **{f"msg/{k}": v for k, v in kinds.items()},
    }
